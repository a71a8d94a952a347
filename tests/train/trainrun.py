"""Helpers for the trainer's tests: launch the real stage (plain, or under torchrun) and read results."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

FAST = ["--model", "clipforge-micro", "--batch-size", "16", "--warmup", "2", "--lr", "1e-3",
        "--workers", "1", "--log-every-n-steps", "1", "--val-data", "none"]
STEP_LINE = re.compile(r"Step: (\d+)/(\d+) .*LR: ([0-9.e-]+) .*Loss: ([0-9.e+-]+|nan)")


def train_env(cli_env: dict, **extra: str) -> dict:
    env = dict(cli_env)
    env.update({"OMP_NUM_THREADS": "1", "CLIPFORGE_DIST_TIMEOUT_S": "120"}, **extra)
    return env


def stage_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", *FAST, *args]


def torchrun_cmd(*torchrun_args: str, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "stages.train",
            *FAST, *train_args]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start a process whose stdout and stderr go to a file the test can watch."""
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def run(cmd: list[str], env: dict, log: Path, timeout: float = 240) -> tuple[int, str]:
    proc = start(cmd, env, log)
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, log.read_text(errors="replace")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def step_lines(text: str) -> list[tuple[int, float, float]]:
    """(step, lr, loss) of every progress line, in order (rank 0 logs them)."""
    return [(int(m[1]), float(m[3]), float(m[4])) for m in STEP_LINE.finditer(text)]


def load_checkpoint(path: str) -> dict:
    with open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def latest(ckpt_dir: Path) -> dict | None:
    p = ckpt_dir / "LATEST"
    return json.loads(p.read_text()) if p.exists() else None


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def kill_a_worker_when(ready, what: str, proc: subprocess.Popen, log: Path) -> None:
    """Once `ready()` holds, SIGKILL one of torchrun's workers; torchrun must then finish the run."""
    try:
        wait_for(ready, 180, what, proc)
        workers = wait_for(lambda: children(proc.pid), 10, "torchrun's workers", proc)
        os.kill(workers[-1], signal.SIGKILL)
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def environ_without_dist() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RANK", "WORLD_SIZE"))}


# The server imports the stage once; each command then runs in a child forked from it, so a
# command is its own process (its own exit code, globals and log file) without paying the
# seconds of importing torch and open_clip again. Nothing has started a thread when it forks.
_PRELOAD = r"""
import json, os, sys, threading
import stages.train.runner, tensorboard, wandb  # what `clipforge train` imports once it runs
from stages.train.cli import main
assert threading.active_count() == 1, threading.enumerate()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(job["env"])
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        try:
            rc = main(job["argv"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(rc)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class PreloadedStage:
    """Runs `clipforge train ARGS` commands one after another, each in a fresh process forked from
    one that has already imported the stage: what `python -m stages.train ARGS` runs, minus the
    start-up. For test files that run many short commands; torchrun commands still launch. Each
    command gets its own environment, except what a library reads when it is imported (e.g.
    HF_HUB_OFFLINE, OMP_NUM_THREADS), which comes from the environment the server started with."""

    def __init__(self, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PRELOAD], env=env, bufsize=0,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._pending = b""

    def run(self, args: list[str], env: dict, log: Path, timeout: float = 600) -> tuple[int, str]:
        self.proc.stdin.write((json.dumps({"argv": args, "env": env, "log": str(log)}) + "\n").encode())
        deadline = time.monotonic() + timeout
        child = int(self._line(deadline, args))
        try:
            rc = int(self._line(deadline, args))
        except AssertionError:
            os.kill(child, signal.SIGKILL)
            raise
        return rc, log.read_text(errors="replace")

    def _line(self, deadline: float, args: list[str]) -> bytes:
        import select

        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if self.proc.poll() is not None or left <= 0:
                raise AssertionError(f"clipforge train {' '.join(args)}: no result in time (or the server ended)")
            if select.select([self.proc.stdout], [], [], min(left, 1.0))[0]:
                self._pending += os.read(self.proc.stdout.fileno(), 4096)
        line, self._pending = self._pending.split(b"\n", 1)
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
