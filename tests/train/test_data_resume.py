"""Data resume under real torchrun: a run killed mid-epoch reads, after its resume, exactly the
samples the uninterrupted run reads, in the same order, on every rank."""

from __future__ import annotations

import os
import re
import signal
from collections import defaultdict
from pathlib import Path

import pytest
from trainrun import children, latest, run, start, torchrun_cmd, train_env, wait_for

ARGS = ["--workers", "2", "--accum-freq", "2", "--batch-size", "16", "--steps", "20",
        "--save-every-steps", "3", "--resume", "latest"]


def _keys(folder: Path, rank: int) -> dict[int, dict[tuple[int, int], str]]:
    """pid -> {(epoch, batch index in the epoch): the batch's sample keys}."""
    out: dict[int, dict] = defaultdict(dict)
    for line in (folder / f"rank{rank}.keys").read_text().splitlines():
        pid, epoch, index, keys = line.split(" ", 3)
        out[int(pid)][(int(epoch), int(index))] = keys
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_reads_exactly_what_the_uninterrupted_run_reads(train_shards, tmp_path,
                                                                                      cli_env):
    def cmd(run_id: str, *extra: str) -> list[str]:
        return torchrun_cmd("--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.2", *extra,
                            train_args=["--train-data", str(train_shards), "--root", str(tmp_path),
                                        "--run-id", run_id, *ARGS])

    whole, killed = tmp_path / "keys-whole", tmp_path / "keys-killed"
    whole.mkdir()
    killed.mkdir()
    rc, log = run(cmd("whole"), train_env(cli_env, CLIPFORGE_DEBUG_SAMPLE_KEYS=str(whole)), tmp_path / "whole.log")
    assert rc == 0, log[-3000:]

    ckpts = tmp_path / "killed" / "checkpoints"
    proc = start(cmd("killed", "--max-restarts", "1"), train_env(cli_env, CLIPFORGE_DEBUG_SAMPLE_KEYS=str(killed)),
                 tmp_path / "killed.log")
    try:
        # 512 samples / (2 ranks x 16) = 16 batches = 8 steps per epoch: step 9 is mid-epoch 1
        wait_for(lambda: (p := latest(ckpts)) and p["step"] >= 9, 240, "a checkpoint at step 9", proc)
        workers = wait_for(lambda: children(proc.pid), 10, "torchrun's workers", proc)
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(300) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "killed.log").read_text()
    step, epoch = map(int, re.findall(r"resumed from \S+ at step (\d+) \(epoch (\d+)\)", text)[0])
    assert step % 8 != 0, "the resume point must be inside an epoch"
    resume_point = (epoch, (step - 8 * epoch) * 2)  # batches of the epoch taken before the save
    for rank in range(2):
        reference = next(iter(_keys(whole, rank).values()))
        runs = _keys(killed, rank)
        assert len(runs) == 2, "one process before the kill, one after"
        after = runs[max(runs, key=lambda pid: min(runs[pid]))]
        expected = {pos: keys for pos, keys in reference.items() if pos > resume_point}
        assert min(after) == (epoch, resume_point[1] + 1)
        assert after == expected, f"rank {rank} read other samples after the resume"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_repeats_the_uninterrupted_losses(train_shards, tmp_path, cli_env, workers):
    """Augmentation included: each sample's random crop comes from its own seed, not from the RNG
    state of whichever process decoded it, so a run resumed mid-epoch logs exactly the uninterrupted
    run's losses (the learning rate on). In-process (--workers 0) decoding runs ahead of the step
    that saves, which used to give the first resumed batch other crops."""
    from trainrun import stage_cmd, step_lines

    runs = tmp_path / "runs"

    def train(run_id: str, workers: int, *extra: str) -> list[tuple[int, float, float]]:
        cmd = stage_cmd("--train-data", str(train_shards), "--batch-size", "8", "--steps", "5",
                        "--workers", str(workers), "--root", str(runs), "--run-id", run_id, *extra)
        rc, out = run(cmd, train_env(cli_env), tmp_path / f"{run_id}.log", timeout=600)
        assert rc == 0, out
        return step_lines(out)

    whole = train("whole", workers, "--save-every-steps", "2")
    resumed = train("resumed", workers, "--resume", str(runs / "whole/checkpoints/step_2.pt"))
    assert [s for s, _, _ in resumed] == [3, 4, 5]
    assert resumed == whole[2:]  # the logged (step, lr, loss), to the printed digits
