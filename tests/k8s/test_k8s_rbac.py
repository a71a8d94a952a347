"""Least privilege: the launcher's Role grants exactly the API calls it makes; no other workload has any.

No Kubernetes API server can run here: the launcher talks to a stand-in on 127.0.0.1 that answers
the few endpoints it uses and records every request, so the test sees the calls the real launcher
(kubeflow-training's TrainingClient underneath) makes in a whole run: create, follow logs, wait,
clean up.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s

from pipelines import cluster, podspec
from pipelines.launcher import run_pytorchjob
from pipelines.pytorchjob import TrainJob

NS = "clipforge"
_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/[^/]+/(?P<resource>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")


class StandInAPI(BaseHTTPRequestHandler):
    """PyTorchJobs that go Created -> Running -> Succeeded over three reads; one master pod with a log."""

    calls: list[tuple[str, str, str]]
    job: dict
    reads = 0

    def log_message(self, *args) -> None:
        pass

    def _reply(self, body, code: int = 200, text: bool = False) -> None:
        data = body.encode() if text else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> re.Match:
        url = urlparse(self.path)
        match = _PATH.match(url.path)
        assert match, self.path
        group, resource, name, sub = match["group"] or "", match["resource"], match["name"], match["sub"]
        query = parse_qs(url.query)
        verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}.get(self.command)
        if verb is None:
            verb = "get" if name else ("watch" if query.get("watch") == ["true"] else "list")
        type(self).calls.append((group, f"{resource}/{sub}" if sub else resource, verb))
        return match

    def do_POST(self) -> None:
        self._record()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).job = body
        self._reply(body, 201)

    def do_GET(self) -> None:
        match = self._record()
        if match["resource"] == "pytorchjobs":
            type(self).reads += 1
            state = ["Created", "Running", "Succeeded"][min(type(self).reads, 3) - 1]
            job = dict(type(self).job, status={"conditions": [
                {"type": t, "status": "True", "reason": t} for t in ("Created", "Running", "Succeeded")
                [:("Created", "Running", "Succeeded").index(state) + 1]]})
            self._reply(job)
        elif match["sub"] == "log":
            self._reply("step 1 loss 1.0\n", text=True)
        else:
            self._reply({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [{
                "metadata": {"name": "clipforge-train-x-master-0", "namespace": NS},
                "status": {"phase": "Running"}}]})

    def do_DELETE(self) -> None:
        self._record()
        self._reply({"kind": "Status", "apiVersion": "v1", "status": "Success"})


@pytest.fixture
def api_server():
    StandInAPI.calls, StandInAPI.reads, StandInAPI.job = [], 0, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _granted(rules) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule.api_groups
            for resource in rule.resources for verb in rule.verbs}


def test_launcher_role_grants_exactly_the_calls_of_a_whole_launch(api_server, capsys):
    from kubeflow.training import TrainingClient

    config = k8s.Configuration(host=api_server)
    client = TrainingClient(client_configuration=config, namespace=NS, job_kind="PyTorchJob")
    job = TrainJob(name="clipforge-train-x", namespace=NS, run_id="x", train_args=["--steps", "1"])
    run_pytorchjob(job, cleanup="always", client=client, poll_s=1, log=lambda msg: None)

    made = set(StandInAPI.calls)
    assert ("kubeflow.org", "pytorchjobs", "create") in made and ("", "pods/log", "get") in made
    assert "step 1 loss 1.0" in capsys.readouterr().out  # the master's log was followed
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
