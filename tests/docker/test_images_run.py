"""The stage images, built for real (tests/docker/conftest.py), run the demo pipeline locked down.

Each container runs as uid 1000 with a read-only root filesystem, all capabilities dropped and only
the writable paths the k8s manifests give the pods (pipelines/podspec.WRITABLE_DIRS) as tmpfs. They
reach the moto S3 server and the demo's image server on loopback through `--network host`.
"""

from __future__ import annotations

import json
import sys
import time

import fsspec
import pytest
from dockerkit import REGISTRY, TAG, docker, run_build

from pipelines.podspec import RUN_AS_USER, WRITABLE_DIRS

# The first test pays for the session fixture: bootstrap, wheelhouse and four builds (minutes).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
STAGES = ("download", "train", "evaluate", "export")


def image(stage: str) -> str:
    return f"{REGISTRY}/clipforge-{stage}:{TAG}"


def locked_down(env: dict[str, str]) -> list[str]:
    """`docker run` flags matching the pods' securityContext and emptyDirs in k8s/."""
    flags = ["--rm", "--network", "host", "--user", f"{RUN_AS_USER}:{RUN_AS_USER}", "--read-only",
             "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    for path, size in WRITABLE_DIRS.values():
        flags += ["--tmpfs", f"{path}:rw,uid={RUN_AS_USER},gid={RUN_AS_USER},size={size.removesuffix('i')}"]
    for key, value in env.items():
        flags += ["-e", f"{key}={value}"]
    return flags


def inspect(host: str, name: str, fmt: str) -> str:
    proc = docker(host, "image", "inspect", "--format", fmt, name)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_every_stage_image_is_built_on_the_bootstrapped_base(docker_engine, stage_images):
    assert stage_images["base"] == "clipforge-base:bookworm"
    assert set(stage_images["images"]) == set(STAGES)
    base_layers = json.loads(inspect(docker_engine, stage_images["base"], "{{json .RootFS.Layers}}"))
    layers = {}
    for stage in STAGES:
        assert inspect(docker_engine, image(stage), "{{.Config.User}}") == "1000:1000"
        assert json.loads(inspect(docker_engine, image(stage), "{{json .Config.Entrypoint}}")) == [
            "python", "-m", f"stages.{stage}"]
        layers[stage] = json.loads(inspect(docker_engine, image(stage), "{{json .RootFS.Layers}}"))
        assert layers[stage][:len(base_layers)] == base_layers, stage
    # the torch images are one set of layers; the download image shares all but its last three
    # (its own dependency layer, the source, clipforge itself) with them
    assert layers["train"] == layers["evaluate"] == layers["export"]
    shared = next(i for i, (a, b) in enumerate(zip(layers["download"], layers["train"], strict=False)) if a != b)
    assert shared > len(base_layers) and len(layers["download"]) - shared == len(layers["train"]) - shared == 3


def test_download_image_has_no_torch_and_the_train_image_has_the_launcher(docker_engine, stage_images):
    probe = "import importlib.util as u; print(*[bool(u.find_spec(m)) for m in ('torch', 'img2dataset', 'kfp')])"
    proc = docker(docker_engine, "run", *locked_down({}), "--entrypoint", "python", image("download"), "-c", probe)
    assert proc.stdout.split() == ["False", "True", "True"], proc.stderr
    probe = "import torch, open_clip, kubeflow.training, pipelines.launcher; print(torch.__version__)"
    proc = docker(docker_engine, "run", *locked_down({}), "--entrypoint", "python", image("train"), "-c", probe)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.14.1+cu130", proc.stderr[-2000:]  # the CUDA build


def test_the_root_filesystem_is_read_only_and_the_user_is_not_root(docker_engine, stage_images):
    probe = ("import os\ntry:\n    open('/opt/clipforge/x', 'w')\nexcept OSError as e:\n    print(e.strerror)\n"
             "open('/tmp/ok', 'w').write('x'); open(os.path.expanduser('~/ok'), 'w').write('x'); print(os.getuid())")
    proc = docker(docker_engine, "run", *locked_down({}), "--entrypoint", "python", image("export"), "-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["Read-only file system", "1000"]
    # without --user the image's own USER applies: still uid 1000
    proc = docker(docker_engine, "run", "--rm", "--entrypoint", "id", image("download"), "-u")
    assert proc.stdout.strip() == "1000"


def _run_stage(host: str, env: dict, stage: str, args: list[str], extra: list[str] = (), timeout: int = 600):
    started = time.monotonic()
    proc = docker(host, "run", *locked_down(env), *extra, image(stage), *args, timeout=timeout)
    elapsed = round(time.monotonic() - started, 1)
    assert proc.returncode == 0, f"{stage} container failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, elapsed


def test_demo_pipeline_runs_in_the_stage_containers(docker_engine, stage_images, s3, moto_server):
    """The kfp.local run's steps and results contract, each step in its own locked-down container."""
    env = {"AWS_ENDPOINT_URL": moto_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    root, run_id = f"{s3}/runs", "docker"
    run = f"{root}/{run_id}"
    common = ["--root", root, "--run-id", run_id]
    latest = f"{run}/checkpoints/LATEST"
    times = {}
    _, times["download"] = _run_stage(docker_engine, env, "download", [
        *common, "--demo", "--demo-samples", "300", "--samples-per-shard", "100", "--processes", "1",
        "--threads", "8"])
    proc, times["train"] = _run_stage(docker_engine, env, "train", [
        "--standalone", "--nproc-per-node", "2", "--module", "stages.train", *common,
        "--train-data", f"{run}/data", "--model", "clipforge-demo", "--batch-size", "32", "--steps", "8",
        "--save-every-steps", "4", "--warmup", "2", "--workers", "0", "--resume", "latest", "--device", "cpu"],
        extra=["--shm-size", "512m", "--entrypoint", "torchrun"])
    assert "8 steps of 64 samples" in proc.stdout + proc.stderr  # 2 torchrun ranks x batch 32
    _, times["evaluate"] = _run_stage(docker_engine, env, "evaluate", [
        *common, "--checkpoint", latest, "--batch-size", "64", "--workers", "0",
        "--output", f"{run}/eval/results.json", "--eval-data", f"demo={run}/evalsets/demo",
        "--val-data", f"{run}/data"])
    proc, times["export"] = _run_stage(docker_engine, env, "export", [
        *common, "--checkpoint", latest, "--output", f"{run}/export"])
    print("\ncontainer run of the demo (s):", json.dumps(times), file=sys.stderr)

    fs = fsspec.filesystem("s3")
    assert json.loads(fs.cat(f"{run}/checkpoints/LATEST"))["step"] == 8
    assert set(json.loads(fs.cat(f"{run}/eval/results.json"))["datasets"]) == {"demo", "val"}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/export", detail=False)}
    assert json.loads(fs.cat(f"{run}/data/manifest.json"))["total_samples"] == 300
    record = json.loads(fs.cat(f"{run}/run.json"))
    assert set(record["stages"]) == set(STAGES)
    assert record["stages"]["train"]["versions"]["torch"] == "2.14.1"


def test_a_wheelhouse_missing_a_package_fails_the_build_and_names_it(docker_engine, stage_images, wheelhouse,
                                                                       tmp_path):
    partial = tmp_path / "wheels"
    partial.mkdir()
    for wheel in wheelhouse.iterdir():
        if not wheel.name.lower().startswith("img2dataset"):
            (partial / wheel.name).hardlink_to(wheel)
    proc = run_build(docker_engine, "download", "--base-image", stage_images["base"], "--wheelhouse", str(partial),
                     "--registry", REGISTRY, "--tag", "broken", timeout=600)
    assert proc.returncode != 0
    assert "docker build of download failed" in proc.stderr and "img2dataset" in proc.stderr
    assert docker(docker_engine, "image", "inspect", image("download").replace(TAG, "broken")).returncode != 0
