"""k8s/: kustomize builds, every object validates, pods are locked down, YAML matches the builder."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8skit import DIRS, K8S, KUBERNETES_VERSION, kustomize, pod_templates, pytorchjob_schema, webhook_errors

from pipelines import manifests
from pipelines.podspec import to_dict
from pipelines.presets import PRESETS
from pipelines.pytorchjob import build_pytorchjob
from tests.conftest import which

CORE_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap", "Job", "NetworkPolicy"}


@pytest.mark.parametrize("rel", DIRS)
def test_each_directory_builds_the_whole_system(built, rel):
    kinds = sorted(obj["kind"] for obj in built[rel])
    assert kinds == sorted(["Namespace", *["ServiceAccount"] * 5, "Role", "RoleBinding", "Secret", "Secret",
                            "ConfigMap", "Job", "Job", "PyTorchJob", *["NetworkPolicy"] * 4])
    assert {obj["metadata"].get("namespace") for obj in built[rel] if obj["kind"] != "Namespace"} == {"clipforge"}


@pytest.mark.parametrize("rel", DIRS)
def test_core_objects_validate_strictly(built, rel):
    core = [obj for obj in built[rel] if obj["kind"] in CORE_KINDS]
    assert len(core) == 17
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field(built):
    job = copy.deepcopy(next(o for o in built["base"] if o["kind"] == "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("rel", DIRS)
def test_pytorchjob_matches_crd_schema_and_webhook_rules(built, rel, schemas_dir):
    schema = pytorchjob_schema(schemas_dir)
    (job,) = [obj for obj in built[rel] if obj["kind"] == "PyTorchJob"]
    jsonschema.validate(job, schema)
    assert webhook_errors(job) == []


def test_schema_and_webhook_checks_catch_bad_jobs(built, schemas_dir):
    schema = pytorchjob_schema(schemas_dir)
    (job,) = [obj for obj in built["overlays/cpu-smoke"] if obj["kind"] == "PyTorchJob"]
    bad = copy.deepcopy(job)
    bad["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(job)
    bad["metadata"]["name"] = "Clipforge_Train"
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    bad["spec"]["elasticPolicy"] = {"nProcPerNode": 2}
    del bad["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert len(webhook_errors(bad)) == 4


@pytest.mark.parametrize("rel", DIRS)
def test_every_pod_is_locked_down_and_sized(built, rel):
    for obj in built[rel]:
        for where, template in pod_templates(obj):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod["automountServiceAccountToken"] is False, where
            assert pod["serviceAccountName"] != "clipforge-launcher", where  # no workload has API rights
            writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, where
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert {"/tmp", "/home/clipforge"} <= set(mounts) and set(mounts.values()) <= writable, where
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert set(c["resources"]["requests"]) >= {"cpu", "memory"}, where
                assert set(c["resources"]["limits"]) >= {"cpu", "memory"}, where
            assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false", where
        if obj["kind"] == "Job":
            assert obj["spec"]["backoffLimit"] >= 0 and obj["spec"]["ttlSecondsAfterFinished"] > 0
        if obj["kind"] == "PyTorchJob":
            policy = obj["spec"]["runPolicy"]
            assert policy["backoffLimit"] >= 0 and policy["ttlSecondsAfterFinished"] > 0


def test_download_is_an_indexed_job_whose_pods_split_one_url_list(built):
    (download,) = [o for o in built["base"] if o["kind"] == "Job" and o["metadata"]["name"] == "clipforge-download"]
    assert download["spec"]["completionMode"] == "Indexed"
    assert download["spec"]["completions"] == 4
    argv = download["spec"]["template"]["spec"]["containers"][0]["command"]
    assert argv[argv.index("--url-list") + 1] == "s3://clipforge/input/urls.parquet"  # not pre-split
    assert argv[argv.index("--num-parts") + 1] == "4"
    assert argv[argv.index("--part-index") + 1] == "auto"  # JOB_COMPLETION_INDEX, set by Kubernetes
    # then every pod tries the merge; it succeeds in the last one to finish
    assert argv[:2] == ["sh", "-c"] and "--merge-parts 4; rc=$?" in argv[2]
    (train,) = [o for o in built["base"] if o["kind"] == "PyTorchJob"]
    train_argv = train["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert train_argv[train_argv.index("--train-data") + 1] == "s3://clipforge/runs/example/data"


def test_gpu_overlay_queues_gang_schedules_and_ships_its_priority_class(built):
    (job,) = [o for o in built["overlays/gpu"] if o["kind"] == "PyTorchJob"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "clipforge"
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2, "priorityClass": "clipforge-training"}
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["priorityClassName"] == "clipforge-training"
    (prio,) = [o for o in kustomize(which("kubectl"), "overlays/gpu") if o["kind"] == "PriorityClass"]
    assert prio["metadata"]["name"] == "clipforge-training" and prio["preemptionPolicy"] == "Never"


def test_gpu_overlay_is_elastic_nccl_on_several_gpu_nodes(built):
    (job,) = [o for o in built["overlays/gpu"] if o["kind"] == "PyTorchJob"]
    spec = job["spec"]
    assert spec["elasticPolicy"]["maxRestarts"] > 0
    assert spec["elasticPolicy"]["minReplicas"] < spec["elasticPolicy"]["maxReplicas"]
    assert int(spec["nprocPerNode"]) > 1
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] > 1
    pod = worker["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == spec["nprocPerNode"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert "--device" in container["command"] and "cuda" in container["command"]


def test_cpu_smoke_overlay_runs_the_micro_model_without_gpus(built):
    (job,) = [o for o in built["overlays/cpu-smoke"] if o["kind"] == "PyTorchJob"]
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        container = spec["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        argv = container["command"]
        assert argv[argv.index("--model") + 1] == "clipforge-micro"
        assert argv[argv.index("--device") + 1] == "cpu"  # gloo: the trainer picks it for CPU devices


@pytest.mark.parametrize("preset,rel", [("base", "base"), ("cpu-smoke", "overlays/cpu-smoke"),
                                        ("gpu", "overlays/gpu")])
def test_launcher_creates_the_same_pytorchjob_as_the_overlay(built, preset, rel):
    (from_kustomize,) = [o for o in built[rel] if o["kind"] == "PyTorchJob"]
    assert to_dict(build_pytorchjob(PRESETS[preset]().train)) == from_kustomize


def test_rbac_lets_the_launcher_manage_pytorchjobs_and_read_logs(built):
    (role,) = [o for o in built["base"] if o["kind"] == "Role"]
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants == {("kubeflow.org", "pytorchjobs"): {"create", "get", "delete"}, ("", "pods"): {"list"},
                      ("", "pods/log"): {"get"}}  # tests/k8s/test_k8s_rbac.py: the calls it makes
    (binding,) = [o for o in built["base"] if o["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["name"] == binding["roleRef"]["name"] == "clipforge-launcher"


def test_secret_template_holds_no_values(built):
    secrets = {o["type"]: o for o in built["base"] if o["kind"] == "Secret"}
    assert set(secrets) == {"Opaque", "kubernetes.io/service-account-token"}
    token = secrets["kubernetes.io/service-account-token"]  # Kubernetes fills it in the cluster
    assert "data" not in token and "stringData" not in token
    secret = secrets["Opaque"]
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(value == "" for value in secret["stringData"].values())
    assert "data" not in secret


def test_checked_in_yaml_is_what_the_builder_renders():
    stale = [str(rel) for rel, text in manifests.rendered().items() if (K8S / rel).read_text() != text]
    assert not stale, f"k8s/ is stale, run `clipforge pipeline render-k8s`: {stale}"


def test_kfp_steps_get_a_read_only_root_at_admission(tmp_path):
    """k8s/kfp: Kubernetes' MutatingAdmissionPolicy (GA in 1.36) on the pods the pipeline labels."""
    from pipelines import admission
    from pipelines.cli import main as pipeline_main

    policy, binding = kustomize(which("kubectl"), "kfp")
    for obj in (policy, binding):
        kubernetes_validate.validate(obj, "1.36.0", strict=True)
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    conditions = " ".join(c["expression"] for c in policy["spec"]["matchConditions"])
    assert f"'{admission.STEP_LABEL}'" in conditions and "'main'" in conditions
    (mutation,) = policy["spec"]["mutations"]
    assert "readOnlyRootFilesystem: true" in mutation["applyConfiguration"]["expression"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    out = tmp_path / "p.yaml"
    assert pipeline_main(["compile", "--output", str(out)]) == 0
    _, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors and all(admission.STEP_LABEL in ex["podMetadata"]["labels"] for ex in executors.values())
