"""Least privilege: the launcher's Role grants exactly the API calls it makes; no other workload has any.

No Kubernetes API server can run here: the launcher talks, through the real `kubernetes` client, to
the STAND-IN API server on 127.0.0.1 of tests/pipelines/k8s_standin.py, which records every request.
The run below makes every kind of call a launch can make: create (409: a finished job of the same
run exists), get, delete and re-create it, list pods, follow the master's log, wait, clean up.
"""

from __future__ import annotations

import re
import threading
import time

from pipelines import cluster, jobapi, podspec
from pipelines.launcher import Launch, run_pytorchjob
from pipelines.pytorchjob import TrainJob
from tests.pipelines.k8s_standin import StandInApiServer

NS = "clipforge"
_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/[^/]+/(?P<resource>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
_VERBS = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}


def _rbac_calls(requests) -> set[tuple[str, str, str]]:
    """(api group, resource[/subresource], RBAC verb) of each recorded request."""
    out = set()
    for method, path, _status in requests:
        match = _PATH.match(path.split("?", 1)[0])
        assert match, path
        verb = _VERBS.get(method) or ("get" if match["name"] else "list")
        resource = f"{match['resource']}/{match['sub']}" if match["sub"] else match["resource"]
        out.add((match["group"] or "", resource, verb))
    return out


def _granted(rules) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule.api_groups
            for resource in rule.resources for verb in rule.verbs}


def _until(predicate, timeout: float = 20) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.02)


def test_launcher_role_grants_exactly_the_calls_of_a_whole_launch():
    with StandInApiServer() as api:
        old = api.put_job("clipforge-train-x", "Created", "Failed")["metadata"]["uid"]
        job = TrainJob(name="clipforge-train-x", namespace=NS, run_id="x", train_args=["--steps", "1"])
        lines: list[str] = []
        launch = threading.Thread(target=run_pytorchjob, daemon=True, kwargs=dict(
            job=job, launch=Launch(cleanup="always", poll_s=0.05, delete_wait_s=5),
            configuration=api.configuration(), log=lines.append))
        launch.start()
        _until(lambda: api.jobs.get("clipforge-train-x", {}).get("metadata", {}).get("uid") not in (None, old))
        pod = api.add_pod("clipforge-train-x")
        api.start_container(pod)
        api.write_log(pod, "step 1 loss 1.0")
        _until(lambda: any("step 1 loss 1.0" in line for line in lines))
        api.stop_container(pod)
        api.set_condition("clipforge-train-x", "Succeeded")
        launch.join(20)
        assert not launch.is_alive(), lines
        made = _rbac_calls(api.requests)
    assert {("kubeflow.org", "pytorchjobs", "create"), ("kubeflow.org", "pytorchjobs", "delete"),
            ("", "pods/log", "get")} <= made
    (role,) = [o for o in cluster.launcher_rbac(NS) if o.kind == "Role"]
    assert _granted(role.rules) == made


def test_only_the_launcher_has_a_role_and_workloads_mount_no_token():
    objs = cluster.launcher_rbac(NS) + cluster.workload_service_accounts(NS)
    bindings = [o for o in objs if o.kind == "RoleBinding"]
    assert [s.name for b in bindings for s in b.subjects] == [cluster.LAUNCHER_SA]
    accounts = {o.metadata.name: o for o in objs if o.kind == "ServiceAccount"}
    assert set(accounts) == {cluster.LAUNCHER_SA, *podspec.SERVICE_ACCOUNTS.values()}
    for name in podspec.SERVICE_ACCOUNTS.values():
        assert accounts[name].automount_service_account_token is False


def _self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1, as a cluster's CA would issue the API server's."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "ca.crt", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_the_train_step_calls_the_api_with_the_mounted_launcher_token(tmp_path, monkeypatch):
    """The Secret's files, as Kubernetes fills them and the train step mounts them, over TLS."""
    token_dir = tmp_path / "launcher"
    token_dir.mkdir()
    cert, key = _self_signed(token_dir)
    (token_dir / "token").write_text("launcher-token-value")
    with StandInApiServer(tls=(cert, key)) as api:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        monkeypatch.setenv("CLIPFORGE_LAUNCHER_TOKEN_DIR", str(token_dir))
        api.put_job("clipforge-train-y", "Created")
        job = jobapi.JobApi(jobapi.api_client(), "clipforge-train-y", NS).get()
    assert job["metadata"]["name"] == "clipforge-train-y"
    (scheme, token), = [a.split(" ", 1) for a in api.authorizations]  # HTTP auth schemes ignore case
    assert (scheme.lower(), token) == ("bearer", "launcher-token-value")


def test_the_launcher_token_secret_belongs_to_the_launcher_account_only():
    (secret,) = [o for o in cluster.launcher_rbac(NS) if o.kind == "Secret"]
    assert secret.metadata.name == cluster.LAUNCHER_TOKEN_SECRET
    assert secret.type == "kubernetes.io/service-account-token"
    assert secret.metadata.annotations == {"kubernetes.io/service-account.name": cluster.LAUNCHER_SA}
    (account,) = [o for o in cluster.launcher_rbac(NS) if o.kind == "ServiceAccount"]
    assert account.automount_service_account_token is False  # only the mounted Secret carries it
