"""The trainer's torchx component with `-s local_cwd`: two real torchrun processes on the demo data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import which

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchx_local_cwd_trains_with_two_processes_on_demo_data(tmp_path, cli_env):
    root = str(tmp_path / "runs")
    # as with an activated venv: local_cwd runs `torchrun` from PATH
    cli_env["PATH"] = f"{Path(sys.executable).parent}:{cli_env['PATH']}"
    subprocess.run([sys.executable, "-m", "stages.download", "--demo", "--demo-samples", "200",
                    "--demo-eval-samples", "30", "--samples-per-shard", "50", "--threads", "8",
                    "--root", root, "--run-id", "tx"], env=cli_env, check=True, capture_output=True, timeout=600)
    cmd = [which("torchx"), "run", "--wait", "--log", "-s", "local_cwd",
           "pipelines/torchx_components.py:train", "--nproc_per_node", "2", "--",
           "--train-data", f"{root}/tx/data", "--root", root, "--run-id", "tx", "--steps", "4",
           "--batch-size", "16", "--workers", "0", "--warmup", "1", "--save-every-steps", "2",
           "--log-every-n-steps", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "SUCCEEDED" in out, out[-3000:]
    latest = json.loads(Path(root, "tx", "checkpoints", "LATEST").read_text())
    assert latest["step"] == 4
    assert "4 steps of 32 samples" in out  # 2 ranks x batch 16


def test_torchx_component_defaults_to_the_image_make_images_builds():
    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        import torchx_components
    finally:
        sys.path.remove(str(REPO / "pipelines"))
    from pipelines.images import image

    app = torchx_components.train("--steps", "1")
    assert {role.image for role in app.roles} == {image("train", "ghcr.io/clipforge", "latest")}
