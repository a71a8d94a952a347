"""The compiled pipeline: up to date, loads with kfp, four steps in order wired by object-store URIs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp import components

from pipelines.cli import main as pipeline_main

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "pipelines" / "clip_pipeline.yaml"
STEPS = ["download", "train", "evaluate", "export"]


@pytest.fixture
def default_images(monkeypatch):
    monkeypatch.delenv("CLIPFORGE_REGISTRY", raising=False)
    monkeypatch.delenv("CLIPFORGE_TAG", raising=False)


def _compile(tmp_path, *flags) -> tuple[dict, dict]:
    out = tmp_path / "p.yaml"
    assert pipeline_main(["compile", "--output", str(out), *flags]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_checked_in_pipeline_is_not_stale(tmp_path, default_images):
    out = tmp_path / "p.yaml"
    pipeline_main(["compile", "--output", str(out)])
    assert out.read_text() == CHECKED_IN.read_text(), "run `make pipeline` and commit pipelines/clip_pipeline.yaml"


def test_compiled_pipeline_loads_with_kfp_and_chains_the_four_steps():
    pipeline = components.load_component_from_file(str(CHECKED_IN))
    assert pipeline.name == "clipforge"
    spec = next(yaml.safe_load_all(CHECKED_IN.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(STEPS)
    order = sorted(STEPS, key=lambda t: len(tasks[t].get("dependentTasks", [])))
    assert order == STEPS
    assert tasks["evaluate"]["dependentTasks"] == ["download", "train"]

    def source(task, name):
        ref = tasks[task]["inputs"]["parameters"][name]
        if "taskOutputParameter" in ref:
            return ref["taskOutputParameter"]["producerTask"], ref["taskOutputParameter"]["outputParameterKey"]
        return "pipeline", ref["componentInputParameter"]

    assert source("train", "train_data") == ("download", "data")
    assert source("train", "run_id") == ("download", "run_id")
    assert source("evaluate", "checkpoint") == ("train", "Output")
    assert source("evaluate", "val_data") == ("download", "data")
    assert source("export", "checkpoint") == ("train", "Output")
    assert source("train", "model") == ("pipeline", "model")
    assert "evaluate" in tasks["export"]["dependentTasks"]
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["model"] == "clipforge-demo" and defaults["demo"] is True
    assert defaults["launcher"] == "pytorchjob"


def test_registry_and_tag_choose_each_steps_image(tmp_path):
    spec, _ = _compile(tmp_path, "--registry", "registry.example.com/ml", "--tag", "v1.2")
    images = {name.removeprefix("exec-"): ex["container"]["image"]
              for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert images == {s: f"registry.example.com/ml/clipforge-{s}:v1.2" for s in STEPS}
    train_default = spec["components"]["comp-train"]["inputDefinitions"]["parameters"]
    assert "default_train_image" in train_default  # the PyTorchJob runs the same train image
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["inputs"]["parameters"]["default_train_image"]["runtimeValue"]["constant"] == \
        "registry.example.com/ml/clipforge-train:v1.2"


def test_cluster_settings_of_the_steps(tmp_path):
    _, executors = _compile(tmp_path, "--image-pull-policy", "Always",
                            "--gpu-node-selector", "nvidia.com/gpu.present=true")
    for step in STEPS:
        ex = executors[f"exec-{step}"]
        assert ex["imagePullPolicy"] == "Always"
        (secret,) = [s for s in ex["secretAsEnv"] if s["secretName"] == "clipforge-s3"]
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert ex["configMapAsEnv"][0]["keyToEnv"][0]["envVar"] == "AWS_ENDPOINT_URL"
        assert ex["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}
        # the only writable paths under a read-only root filesystem, as in k8s/ and the container test
        assert {(m["mountPath"], m.get("sizeLimit")) for m in ex["emptyDirMounts"] if "medium" not in m} == {
            ("/tmp", "4Gi"), ("/home/clipforge", "4Gi")}
    for step in ("train", "evaluate"):
        assert {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"} in \
            executors[f"exec-{step}"]["emptyDirMounts"]
    evaluate = executors["exec-evaluate"]
    assert evaluate["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert evaluate["tolerations"][0]["key"] == "nvidia.com/gpu"
