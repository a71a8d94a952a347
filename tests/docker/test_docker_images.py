"""docker/: one linted, pinned, non-root Dockerfile per stage; the download image's install has no torch.

The images themselves are built and run in test_images_run.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import which

REPO = Path(__file__).resolve().parents[2]
STAGES = ("download", "train", "evaluate", "export")


def dockerfile(stage: str) -> str:
    return (REPO / "docker" / f"{stage}.Dockerfile").read_text()


def base_image(text: str) -> str:
    return re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)


def pip_installs(text: str) -> list[str]:
    return re.findall(r"pip install (?:--no-cache-dir )?\$\{WHEELHOUSE:\+--no-index --find-links \$WHEELHOUSE\} "
                      r"-c constraints.txt (.+?)(?: \\)?$", text, re.M)


def dependency_extras(text: str) -> list[list[str]]:
    """The extras of each dependency layer: `$(python3 deps.py core) kfp` -> ["core", "kfp"]."""
    return [re.sub(r"\$\(python3 deps.py ([^)]*)\)", r"\1", line).split() for line in pip_installs(text)]


def test_one_dockerfile_per_stage_and_hadolint_passes():
    assert sorted(p.name for p in (REPO / "docker").glob("*.Dockerfile")) == sorted(f"{s}.Dockerfile" for s in STAGES)
    proc = subprocess.run([which("hadolint"), *[f"docker/{s}.Dockerfile" for s in STAGES]],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    assert subprocess.run([which("hadolint"), str(bad)], capture_output=True).returncode != 0


@pytest.mark.parametrize("stage", STAGES)
def test_images_are_pinned_constrained_and_non_root(stage):
    text = dockerfile(stage)
    base = base_image(text)
    assert re.search(r":\d+\.\d+\.\d+", base) and "latest" not in base, base
    assert "FROM ${BASE_IMAGE}" in text
    assert len(pip_installs(text)) == 3  # common layer, stage-family layer, clipforge itself
    assert re.findall(r"^USER (\S+)$", text, re.M) == ["1000:1000"]  # runAsUser in k8s/
    assert f'ENTRYPOINT ["python", "-m", "stages.{stage}"]' in text


def test_torch_images_share_one_dependency_layer_and_download_has_no_torch():
    layers = {stage: dependency_extras(dockerfile(stage)) for stage in STAGES}
    assert all(layers[s][0] == ["core", "kfp"] for s in STAGES)  # shared by all four
    assert layers["download"][1] == ["download"]
    assert layers["train"][1] == layers["evaluate"][1] == layers["export"][1] == [
        "train", "evaluate", "export", "pipeline"]  # the launcher runs in the train image
    assert layers["download"][2] == layers["train"][2] == ["--no-deps", "."]
    def instructions(stage: str) -> list[str]:
        return [ln.replace(f"stages.{stage}", "X") for ln in dockerfile(stage).splitlines() if ln and not ln.startswith("#")]
    # the same instructions up to the entrypoint: the build cache makes them the same layers
    assert instructions("train") == instructions("evaluate") == instructions("export")


def test_deps_script_reads_the_extras_from_pyproject():
    proc = subprocess.run([sys.executable, "docker/deps.py", "core", "download"], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert {"fsspec", "s3fs", "img2dataset", "webdataset"} <= set(proc.stdout.split()) and "torch" not in proc.stdout
    bad = subprocess.run([sys.executable, "docker/deps.py", "trian"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown extra(s) trian" in bad.stderr


def test_dockerignore_sends_only_what_the_images_copy():
    lines = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "**"
    allowed = {ln[1:].removesuffix("/**") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "README.md", "docker/deps.py", "stages", "pipelines"}
    for stage in STAGES:
        copies = re.findall(r"^COPY (.+) \S+$", dockerfile(stage), re.M)
        assert copies == ["pyproject.toml constraints.txt docker/deps.py", "."], stage


@pytest.mark.slow
def test_download_dependencies_in_a_fresh_venv_bring_no_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    reqs = []
    for extras in dependency_extras(dockerfile("download"))[:2]:
        named = [e for e in extras if e not in ("core", "download")]
        listed = subprocess.run([sys.executable, "docker/deps.py", *[e for e in extras if e in ("core", "download")]],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
        reqs += listed + named
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), *reqs,
                           "--no-deps", str(REPO)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"img2dataset", "webdataset", "kfp", "clipforge"} <= names
    assert not {"torch", "torchvision", "open-clip-torch"} & names
    check = subprocess.run([str(venv / "bin" / "clipforge"), "download", "--demo", "--check-config"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
