"""Helpers of the image tests: docker/build.py loaded by path, the docker CLI against a given engine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REGISTRY, TAG = "clipforge.test", "test"


def load_build():
    spec = importlib.util.spec_from_file_location("clipforge_docker_build", REPO / "docker" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_env(docker_host: str) -> dict[str, str]:
    return {**os.environ, "DOCKER_HOST": docker_host}


def run_build(docker_host: str, *args: str, timeout: int = 3000, show_progress: bool = False
              ) -> subprocess.CompletedProcess:
    """docker/build.py as `make images` runs it; with show_progress its log goes to the test's stderr."""
    return subprocess.run([sys.executable, str(REPO / "docker" / "build.py"), *args], cwd=REPO,
                          env=build_env(docker_host), stdout=subprocess.PIPE,
                          stderr=None if show_progress else subprocess.PIPE, text=True, timeout=timeout)


def docker(docker_host: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], env=build_env(docker_host), capture_output=True, text=True,
                          timeout=timeout)
