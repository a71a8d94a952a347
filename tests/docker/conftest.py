"""A real Docker engine and the four stage images, built once per test session with docker/build.py.

The engine is a private `dockerd` (root; its own data root, socket and pid file under the session's
temporary folder), stopped by its pid when the session ends. No registry is involved: the base is
bootstrapped from Debian's packages and the packages come from a wheelhouse made here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from dockerkit import REGISTRY, TAG, load_build, run_build


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """DOCKER_HOST of a dockerd started for this session."""
    for tool in ("dockerd", "docker", "debootstrap"):
        assert shutil.which(tool), f"{tool} is missing: `make system-deps` installs docker.io and debootstrap"
    assert os.geteuid() == 0, "dockerd needs root"
    folder = tmp_path_factory.mktemp("engine")
    engine = load_build().Engine(folder).start()
    yield engine.host
    engine.stop()
    shutil.rmtree(folder / "data", ignore_errors=True)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 3 GB of wheels: not left behind in pytest's temp


@pytest.fixture(scope="session")
def stage_images(docker_engine, wheelhouse, tmp_path_factory) -> dict:
    """What `make images` does: bootstrap the base, make the wheelhouse, build the four images."""
    report = tmp_path_factory.mktemp("report") / "images.json"
    proc = run_build(docker_engine, "--wheelhouse", str(wheelhouse), "--registry", REGISTRY, "--tag", TAG,
                     "--report", str(report), show_progress=True)
    assert proc.returncode == 0, proc.stdout[-3000:]  # build.py's error is in the test's stderr
    result = json.loads(report.read_text())
    print("\nimage build:", json.dumps(result), file=sys.stderr)
    return result
