"""Two real torchrun agents on this machine as two nodes of one elastic job (c10d rendezvous on
127.0.0.1, `--max-restarts 1`), with the environment our PyTorchJob manifests give the trainer
container: faults on either node restart both in one round, and a hung rank is noticed in time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from trainrun import children, latest, start, step_lines, torchrun_cmd, train_env, wait_for

from pipelines.presets import cpu_smoke
from pipelines.pytorchjob import build_pytorchjob
from tests.conftest import free_port

FAILED_REJOIN = re.compile(r"connectFullMesh|Connection refused|RendezvousClosedError|"
                           r"RendezvousTimeoutError|DistNetworkError|Timed out")
ROUND = "Rendezvous complete for workers"  # the agent's line for each rendezvous round it joined


def manifest_env() -> dict[str, str]:
    """The env of the `pytorch` container in the rendered cpu-smoke PyTorchJob."""
    job = build_pytorchjob(cpu_smoke().train)
    container = job.spec.pytorch_replica_specs["Master"].template.spec.containers[0]
    return {e.name: e.value for e in container.env}


class TwoAgents:
    """Agents A and B: `torchrun --nnodes 2` each, one worker each, one run of the trainer."""

    def __init__(self, tmp_path: Path, cli_env: dict, train_args: list[str], **env: str):
        self.dir, port = tmp_path, free_port()
        self.env = {**train_env(cli_env), **manifest_env(), "LOGLEVEL": "INFO", **env}
        self.cmd = torchrun_cmd("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job",
                                "--local-addr", "127.0.0.1", "--max-restarts", "1",
                                "--monitor-interval", "0.2", train_args=train_args)
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: list[int] = []

    def __enter__(self) -> TwoAgents:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in "AB":
            self.procs[name] = start(self.cmd, self.env, self.log_path(name))
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_path(self, name: str) -> Path:
        return self.dir / f"agent{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def worker(self, name: str) -> int:
        return wait_for(lambda: children(self.procs[name].pid), 30, f"agent {name}'s worker",
                        self.procs[name])[0]

    def rank0_agent(self) -> str:
        return wait_for(lambda: next((n for n in "AB" if "rank=0]" in self.log(n)), None), 120,
                        "rank 0's first log line")

    def wait(self, timeout: float = 300) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        return {n: p.wait(max(1.0, deadline - time.monotonic())) for n, p in self.procs.items()}

    def logs(self) -> str:
        return self.log("A") + self.log("B")


def _assert_rejoined(agents: TwoAgents, codes: dict, steps: int, faults: int) -> list[int]:
    """Both agents finished; each joined exactly one new round per fault; returns the resume steps."""
    logs = agents.logs()
    assert codes == {"A": 0, "B": 0}, logs[-4000:]
    for name in "AB":
        assert agents.log(name).count(ROUND) == faults + 1, name
    assert not FAILED_REJOIN.search(logs), FAILED_REJOIN.search(logs)[0]
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+)\.pt at step", logs)]
    assert len(resumed) == faults, resumed
    assert max(s for s, _, _ in step_lines(logs)) == steps
    return resumed


def _reached(agents: TwoAgents, ckpts: Path, saved: int, logged: int) -> bool:
    steps = [s for s, _, _ in step_lines(agents.logs())]
    return bool((p := latest(ckpts)) and p["step"] >= saved and steps and steps[-1] >= logged)


@pytest.mark.slow
def test_workers_killed_on_either_node_rejoin_in_one_round(train_shards, tmp_path, cli_env):
    """Twice: SIGKILL B's worker, then A's once the job has resumed; kills right after a checkpoint
    and between two, so a race between the agents' rounds would show."""
    for attempt, offset in enumerate((0, 2)):
        ckpts = tmp_path / f"r{attempt}" / "checkpoints"
        args = ["--train-data", str(train_shards), "--root", str(tmp_path), "--run-id", f"r{attempt}",
                "--steps", "30", "--save-every-steps", "5", "--resume", "latest"]
        kills = []
        with TwoAgents(tmp_path / f"a{attempt}", cli_env, args) as agents:
            for victim, after in (("B", 5), ("A", 15)):
                wait_for(lambda: _reached(agents, ckpts, after, after + offset), 180,  # noqa: B023
                         f"step {after + offset}", agents.procs[victim])
                kills.append(latest(ckpts)["step"])
                os.kill(agents.worker(victim), signal.SIGKILL)
                wait_for(lambda: len(re.findall("resumed from", agents.logs())) >= len(kills), 180,  # noqa: B023
                         "the job to resume")
            codes = agents.wait()
        resumed = _assert_rejoined(agents, codes, 30, faults=2)
        assert latest(ckpts)["step"] == 30 and not (ckpts / "step_35.pt").exists()
        assert all(r >= k for r, k in zip(resumed, kills, strict=True)), (resumed, kills)


@pytest.mark.slow
def test_worker_killed_while_the_other_node_saves_a_checkpoint(flaky_s3, train_shards, tmp_path, cli_env):
    bucket, proxy = flaky_s3
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    args = ["--train-data", str(train_shards), "--root", bucket, "--run-id", "busy", "--steps", "20",
            "--save-every-steps", "5", "--resume", "latest"]
    with TwoAgents(tmp_path, cli_env, args, **env) as agents:
        saver = agents.rank0_agent()
        other = "B" if saver == "A" else "A"
        wait_for(lambda: "checkpoint step 5 ->" in agents.log(saver), 180, "the first checkpoint")
        proxy.delay_s = 0.2  # the checkpoint of step 10 crawls: rank 0 is busy inside its save
        wait_for(lambda: any("PUT" in r and "step_10.pt" in r for r in proxy.requests), 120,
                 "rank 0 uploading step 10")
        os.kill(agents.worker(other), signal.SIGKILL)
        wait_for(lambda: "closing signal SIGTERM" in agents.log(saver), 120, "the saver's agent to stop it")
        proxy.delay_s = 0.0
        codes = agents.wait()
    from stages.common import checkpoints

    before_kill = agents.logs().split("resumed from", 1)[0]
    assert "checkpoint step 10 ->" not in before_kill, "the save was not interrupted"
    assert _assert_rejoined(agents, codes, 20, faults=1) == [5]  # the cut save never became LATEST
    assert checkpoints.read_latest(f"{bucket}/busy/checkpoints")["step"] == 20


@pytest.mark.slow
def test_stopped_rank_is_noticed_by_the_watchdog_and_the_job_finishes(train_shards, tmp_path, cli_env):
    """SIGSTOP the worker on the node without rank 0: the collective timeout is far away (900 s),
    so only the watchdog (--step-timeout 15) can end the wait; the log names the stopped rank."""
    ckpts = tmp_path / "hang" / "checkpoints"
    args = ["--train-data", str(train_shards), "--root", str(tmp_path), "--run-id", "hang", "--steps", "20",
            "--save-every-steps", "5", "--resume", "latest", "--step-timeout", "15"]
    with TwoAgents(tmp_path, cli_env, args, CLIPFORGE_DIST_TIMEOUT_S="900") as agents:
        other = "B" if agents.rank0_agent() == "A" else "A"
        wait_for(lambda: (p := latest(ckpts)) and p["step"] >= 5, 180, "a checkpoint at step 5")
        victim = agents.worker(other)
        agents.stopped.append(victim)
        os.kill(victim, signal.SIGSTOP)
        codes = agents.wait(240)
    logs = agents.logs()
    assert codes == {"A": 0, "B": 0}, logs[-4000:]
    fired = re.search(r"watchdog: rank 0 made no step progress for \d+s \(limit 15s\).*", logs)
    assert fired, logs[-4000:]
    assert "rank 1 hung: no heartbeat" in fired[0], fired[0]
    assert re.findall(r"resumed from \S+step_(\d+)\.pt", logs)
    assert latest(ckpts)["step"] == 20


@pytest.mark.slow
def test_checkpoint_slower_than_the_collective_timeout_does_not_kill_the_other_ranks(
        flaky_s3, train_shards, tmp_path, cli_env):
    """Rank 0 uploads through a crawling link for longer than the (10 s) collective timeout while
    rank 1 waits for it: the run goes on and finishes, no rank exits."""
    bucket, proxy = flaky_s3
    env = {**train_env(cli_env, CLIPFORGE_DIST_TIMEOUT_S="10"), **manifest_env(),
           **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", "2", train_args=[
        "--train-data", str(train_shards), "--root", bucket, "--run-id", "slow", "--steps", "12",
        "--save-every-steps", "6", "--step-timeout", "5"])
    log = tmp_path / "log"
    proc = start(cmd, env, log)
    try:
        wait_for(lambda: "Step: 5/12" in log.read_text(), 180, "step 5", proc)
        proxy.delay_s = 0.05
        saved = wait_for(lambda: re.search(r"checkpoint step 6 -> \S+ \(\S+ MB, ([0-9.]+)s", log.read_text()),
                         240, "the slow checkpoint", proc)
        proxy.delay_s = 0.0
        assert proc.wait(180) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    from stages.common import checkpoints

    assert float(saved[1]) > 10, "the save was not slower than the collective timeout"
    text = log.read_text()
    assert "watchdog:" not in text and "failed (exitcode" not in text, text[-3000:]
    assert checkpoints.read_latest(f"{bucket}/slow/checkpoints")["step"] == 12
