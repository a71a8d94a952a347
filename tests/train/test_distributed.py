"""Real torchrun processes: a simulated 2-node PyTorchJob, and a rank killed mid-run."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from trainrun import (
    kill_a_worker_when,
    latest,
    load_checkpoint,
    run,
    run_json,
    start,
    step_lines,
    torchrun_cmd,
    train_env,
)

from tests.conftest import free_port

STEPS = ["--steps", "12", "--save-every-steps", "6"]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    pointer = latest(run_dir / "checkpoints")
    assert pointer and pointer["step"] == 12
    return load_checkpoint(pointer["uri"])["model"]


@pytest.mark.slow
def test_two_simulated_nodes_match_one_node_with_two_processes(train_shards, tmp_path, cli_env):
    common = ["--train-data", str(train_shards), "--root", str(tmp_path), *STEPS]
    rc, one_node_log = run(torchrun_cmd("--standalone", "--nproc-per-node", "2",
                                        train_args=[*common, "--run-id", "one"]),
                           train_env(cli_env), tmp_path / "one.log")
    assert rc == 0, one_node_log[-3000:]

    port = free_port()
    procs = []
    for node_rank in (0, 1):  # what the training operator injects into each pod of a 2-node job
        env = train_env(cli_env, PET_NNODES="2", PET_NODE_RANK=str(node_rank), PET_NPROC_PER_NODE="1",
                        PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port))
        procs.append(start(torchrun_cmd(train_args=[*common, "--run-id", "two"]), env,
                           tmp_path / f"node{node_rank}.log"))
    try:
        codes = [p.wait(240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]

    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    node0_log = (tmp_path / "node0.log").read_text()
    assert step_lines(node0_log) == step_lines(one_node_log)  # same (step, lr, loss) as logged
    assert len(step_lines(node0_log)) == 12
    assert "Step:" not in (tmp_path / "node1.log").read_text(), "only rank 0 logs progress"
    assert run_json(tmp_path / "two")["stages"]["train"]["outputs"]["world_size"] == 2


@pytest.mark.slow
def test_sigkill_one_rank_resumes_from_latest(train_shards, tmp_path, cli_env):
    ckpts = tmp_path / "kill" / "checkpoints"
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                       "--monitor-interval", "0.2",
                       train_args=["--train-data", str(train_shards), "--root", str(tmp_path),
                                   "--run-id", "kill", "--steps", "60", "--save-every-steps", "5",
                                   "--resume", "latest"])
    proc = start(cmd, train_env(cli_env), tmp_path / "log")
    seen = []
    kill_a_worker_when(lambda: (p := latest(ckpts)) and p["step"] >= 10 and not seen.append(p["step"]),
                       "a checkpoint at step 10", proc, tmp_path / "log")
    saved_before_kill = seen[-1]
    log = (tmp_path / "log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+)\.pt at step", log)]
    assert len(resumed) == 1 and resumed[0] >= saved_before_kill, (resumed, saved_before_kill)
    pointer = latest(ckpts)
    assert pointer["step"] == 60 and [e["step"] for e in pointer["history"]] == [55, 50, 45]
    # saves every 5 steps; the default --keep-last 5 leaves the newest five, LATEST's among them
    assert sorted(int(p.stem.removeprefix("step_")) for p in ckpts.glob("step_*.pt")) == [40, 45, 50, 55, 60]
    final = load_checkpoint(pointer["uri"])  # a plain torch.load(weights_only=True)
    assert hashlib.sha256((ckpts / "step_60.pt").read_bytes()).hexdigest() == pointer["sha256"]
    assert final["progress"]["step"] == 60 and final["samples_seen"] == 60 * 16 * 2
    rng = final["rng"]["ranks"]  # every rank's generators, each its own
    assert final["rng"]["world_size"] == 2 and len(rng) == 2
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert final["data"]["world_size"] == 2 and len(final["data"]["ranks"]) == 2
    record = run_json(tmp_path / "kill")["stages"]["train"]
    assert record["outputs"]["step"] == 60
    assert record["inputs"]["resumed_from"].endswith(f"step_{resumed[0]}.pt")
    steps_after = [s for s, _, _ in step_lines(log.split("resumed from", 1)[1])]
    assert steps_after[0] == resumed[0] + 1 and steps_after[-1] == 60
