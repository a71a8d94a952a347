"""The compiled pipeline: up to date, loads with kfp, steps wired by object-store URIs, and what a
cluster needs of it: KFP artifacts, sizes on every step, no caching, scheduling parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp import components

from pipelines import components as steps
from pipelines.cli import main as pipeline_main

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "pipelines" / "clip_pipeline.yaml"
STEPS = ["plan", "download-parts", "download", "merge-downloads", "train", "evaluate", "export"]


@pytest.fixture
def default_images(monkeypatch):
    monkeypatch.delenv("CLIPFORGE_REGISTRY", raising=False)
    monkeypatch.delenv("CLIPFORGE_TAG", raising=False)


def _compile(tmp_path, *flags) -> tuple[dict, dict]:
    out = tmp_path / "p.yaml"
    assert pipeline_main(["compile", "--output", str(out), *flags]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _checked_in() -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(CHECKED_IN.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the DAG, the download inside the ParallelFor too."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    loop = tasks.pop("for-loop-1")
    tasks.update(spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"])
    return tasks


def test_checked_in_pipeline_is_not_stale(tmp_path, default_images):
    out = tmp_path / "p.yaml"
    pipeline_main(["compile", "--output", str(out)])
    assert out.read_text() == CHECKED_IN.read_text(), "run `make pipeline` and commit pipelines/clip_pipeline.yaml"


def test_compiled_pipeline_loads_with_kfp_and_chains_the_steps():
    pipeline = components.load_component_from_file(str(CHECKED_IN))
    assert pipeline.name == "clipforge"
    spec, _ = _checked_in()
    tasks = _all_tasks(spec)
    assert sorted(tasks) == sorted(STEPS)
    root = spec["root"]["dag"]["tasks"]
    loop = root["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--download-parts-Output"
    assert root["merge-downloads"]["inputs"]["parameters"]["parts"]["taskOutputParameter"]["producerTask"] == \
        "for-loop-1"  # the manifests merge after every download task

    def source(task, name):
        ref = tasks[task]["inputs"]["parameters"][name]
        if "taskOutputParameter" in ref:
            return ref["taskOutputParameter"]["producerTask"], ref["taskOutputParameter"]["outputParameterKey"]
        return "pipeline", ref["componentInputParameter"]

    assert source("train", "train_data") == ("merge-downloads", "data")
    assert source("train", "run_id") == ("plan", "run_id")
    assert source("evaluate", "checkpoint") == ("train", "Output")
    assert source("evaluate", "val_data") == ("merge-downloads", "data")
    assert source("export", "checkpoint") == ("train", "Output")
    assert "evaluate" in tasks["export"]["dependentTasks"]


def test_compiled_defaults_are_a_production_gpu_run():
    spec, _ = _checked_in()
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["demo"] is False and defaults["model"] == "ViT-B-32"
    assert defaults["precision"] == "amp_bf16" and defaults["samples_per_shard"] == 10000
    assert defaults["gpus_per_node"] == 8 and defaults["procs_per_node"] == 0  # one process per GPU
    assert defaults["launcher"] == "pytorchjob" and defaults["download_tasks"] == 4
    assert defaults["queue_name"] == "" and defaults["priority_class"] == "" and defaults["gang_scheduling"] is False


def test_eval_metrics_table_and_model_are_kfp_artifacts():
    spec, _ = _checked_in()
    kinds = {name: a["artifactType"]["schemaTitle"] for name, a in spec["root"]["outputDefinitions"]["artifacts"].items()}
    assert kinds == {"metrics": "system.Metrics", "eval_table": "system.Markdown", "model": "system.Model"}
    selectors = spec["root"]["dag"]["outputs"]["artifacts"]
    assert selectors["metrics"]["artifactSelectors"] == [{"outputArtifactKey": "metrics", "producerSubtask": "evaluate"}]
    assert selectors["model"]["artifactSelectors"] == [{"outputArtifactKey": "model", "producerSubtask": "export"}]


def test_every_step_has_requests_and_limits_and_evaluate_a_gpu_when_training_has_them():
    spec, _ = _checked_in()
    executors = spec["deploymentSpec"]["executors"]
    for step in STEPS:
        res = executors[f"exec-{step}"]["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(res), step
    accel = executors["exec-evaluate"]["container"]["resources"]["accelerator"]
    assert accel["resourceType"] == "nvidia.com/gpu"
    assert accel["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--plan-eval_gpus']}}"
    assert spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]["parameters"]["pipelinechannel--plan-eval_gpus"] == {
        "taskOutputParameter": {"outputParameterKey": "eval_gpus", "producerTask": "plan"}}
    assert steps.plan("r", "x", True, "", 1, "local", 8, 0, "never", "adopt").eval_gpus == 1
    assert steps.plan("r", "x", True, "", 1, "local", 0, 0, "never", "adopt").eval_gpus == 0


def test_no_step_reuses_cached_outputs():
    spec, _ = _checked_in()
    for name, task in _all_tasks(spec).items():
        assert task["cachingOptions"] == {}, name  # kfp writes {enableCache: true} for a cached task


@pytest.mark.parametrize("args, message", [
    (dict(demo=True, url_list="s3://b/urls.parquet"), "give a URL list, or demo=true without one"),
    (dict(demo=False, url_list=""), "give a URL list"),
    (dict(gpus_per_node=8, procs_per_node=4), "procs_per_node=4 but gpus_per_node=8"),
    (dict(download_tasks=0), "download_tasks=0"),
    (dict(download_tasks=3), "download_tasks=3 with demo=true"),
    (dict(cleanup="sometimes"), "cleanup='sometimes': one of always, on-success, never"),
    (dict(on_existing="ignore"), "on_existing='ignore'"),
])
def test_the_first_step_refuses_bad_parameters_before_any_work(args, message):
    given = dict(root="r", run_id="x", demo=True, url_list="", download_tasks=1, launcher="pytorchjob",
                 gpus_per_node=0, procs_per_node=0, cleanup="never", on_existing="adopt") | args
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        steps.plan(**given)


def test_registry_and_tag_choose_each_steps_image(tmp_path):
    spec, _ = _compile(tmp_path, "--registry", "registry.example.com/ml", "--tag", "v1.2")
    images = {name.removeprefix("exec-"): ex["container"]["image"]
              for name, ex in spec["deploymentSpec"]["executors"].items()}
    stage_of = {"plan": "download", "download-parts": "download", "merge-downloads": "download"}
    assert images == {s: f"registry.example.com/ml/clipforge-{stage_of.get(s, s)}:v1.2" for s in STEPS}
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["inputs"]["parameters"]["default_image"]["runtimeValue"]["constant"] == \
        "registry.example.com/ml/clipforge-train:v1.2"  # the PyTorchJob runs the same train image


def test_cluster_settings_of_the_steps(tmp_path):
    spec, executors = _compile(tmp_path, "--image-pull-policy", "Always",
                               "--gpu-node-selector", "nvidia.com/gpu.present=true")
    for step in STEPS:
        ex = executors[f"exec-{step}"]
        assert ex["imagePullPolicy"] == "Always"
        (secret,) = [s for s in ex["secretAsEnv"] if s["secretName"] == "clipforge-s3"]
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert ex["configMapAsEnv"][0]["keyToEnv"][0]["envVar"] == "AWS_ENDPOINT_URL"
        assert ex["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}
        # the only writable paths under a read-only root filesystem, as in k8s/ and the container test
        # (and KFP's local artifact roots, written before upload)
        assert {(m["mountPath"], m.get("sizeLimit")) for m in ex["emptyDirMounts"] if "medium" not in m} == {
            ("/tmp", "4Gi"), ("/home/clipforge", "4Gi"), ("/gcs", "1Gi"), ("/minio", "1Gi"), ("/s3", "1Gi")}
        # no step but train holds the launcher's API token
        mounted = {v["secretName"]: v["mountPath"] for v in ex.get("secretAsVolume", [])}
        assert mounted == ({"clipforge-launcher-token": "/var/run/secrets/clipforge/launcher"}
                           if step == "train" else {}), step
    for step in ("train", "evaluate"):
        assert {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"} in \
            executors[f"exec-{step}"]["emptyDirMounts"]
    # the train step's pod identity, so its PyTorchJob can name it as owner
    assert {e["name"]: e["fieldPath"] for e in executors["exec-train"]["fieldPathAsEnv"]} == {
        "POD_NAME": "metadata.name", "POD_UID": "metadata.uid", "POD_NAMESPACE": "metadata.namespace"}
    evaluate = executors["exec-evaluate"]
    assert evaluate["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert evaluate["tolerations"][0]["key"] == "nvidia.com/gpu"
    # one node-selector format: the same dict reaches the PyTorchJob through the train step
    job = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["job"]["runtimeValue"]["constant"]
    assert job["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert {"queue_name", "priority_class", "gang_scheduling", "on_existing", "keep_on_cancel"} <= set(job)
