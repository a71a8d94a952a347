"""Hang detection: a rank that makes no step progress for `--step-timeout` seconds exits non-zero.

torchrun and the training operator restart a worker group only when a worker exits; a rank stuck in
a collective with a stopped or dead peer, in a data loader, or in a storage call would otherwise hold
every node until the collective timeout. A thread on each rank watches the phase the step loop is in
(data, forward/backward, collective, checkpoint, validation) and the time since the last finished
step. Each rank also publishes a heartbeat (step, phase, time) to the process group's store, so the
rank that gives up can name the ranks that stopped beating or are busy elsewhere.

The long pauses that only rank 0 works through (a checkpoint save, validation) are waited out by the
other ranks on the store, not inside a collective (see `main_only`); they may last up to
`PAUSE_FACTOR` times the step limit (at least `PAUSE_FLOOR_S`), unless rank 0 stops beating.

Without `--step-timeout` the limit is `AUTO_FACTOR` times the slowest of the recent steps, at least
`AUTO_FLOOR_S`; the first step (start-up, compilation) gets `FIRST_STEP_FACTOR` times the limit.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from stages.common.distributed import DistInfo, open_store
from stages.common.errors import ClipforgeError

log = logging.getLogger(__name__)

EXIT_CODE = 6
AUTO_FLOOR_S = 300.0
AUTO_FACTOR = 10.0
FIRST_STEP_FACTOR = 5.0
PAUSE_FACTOR = 6.0
PAUSE_FLOOR_S = 1800.0
PAUSES = ("checkpoint", "validation")
STORE_TIMEOUT_S = 5.0


def _beat_key(rank: int) -> str:
    return f"heartbeat/{rank}"


class Watchdog:
    """Phase markers for the step loop and the thread that ends a rank making no progress."""

    def __init__(self, info: DistInfo, step_timeout: float = 0.0, exit: Callable[[int], Any] = os._exit):
        self.info, self.explicit, self._exit = info, step_timeout, exit
        self.phase_name, self.step = "start-up", 0
        self._since = self._progress = time.monotonic()
        self._recent: collections.deque[float] = collections.deque(maxlen=50)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None
        self.beat_s = max(0.2, min(5.0, (step_timeout or AUTO_FLOOR_S) / 10))

    # limits -----------------------------------------------------------------------------------
    def step_limit(self) -> float:
        base = self.explicit or max(AUTO_FLOOR_S, AUTO_FACTOR * max(self._recent, default=0.0))
        return base if self._recent else base * FIRST_STEP_FACTOR

    def pause_limit(self) -> float:
        return max(PAUSE_FLOOR_S, PAUSE_FACTOR * self.step_limit())

    # markers (main thread) -------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Marks a phase; entering or leaving a pause (checkpoint, validation) counts as progress."""
        previous, self.phase_name = self.phase_name, name
        self._since = now = time.monotonic()
        if name in PAUSES:
            self._progress = now
        try:
            yield
        finally:
            if name in PAUSES:
                self._progress = time.monotonic()
            self.phase_name, self._since = previous, time.monotonic()

    def enter(self, name: str) -> None:
        """Marks the phase the step loop is now in (until the next marker)."""
        self.phase_name, self._since = name, time.monotonic()

    def step_done(self, step: int, seconds: float) -> None:
        self.step, self._progress = step, time.monotonic()
        self._recent.append(seconds)

    # the thread ------------------------------------------------------------------------------
    def start(self) -> Watchdog:
        if self.info.distributed:
            self._store = open_store(self.info, STORE_TIMEOUT_S)
        self._thread = threading.Thread(target=self._watch, name="clipforge-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.beat_s + STORE_TIMEOUT_S)

    def _watch(self) -> None:
        self._beat()
        while not self._stop.wait(self.beat_s):
            self._beat()
            stalled = time.monotonic() - self._progress
            limit = self.pause_limit() if self.phase_name in PAUSES else self.step_limit()
            if stalled > limit:
                self._give_up(stalled, limit, "")
            elif self.phase_name in PAUSES and not self.info.is_main:
                self._check_main_beats()

    def _beat(self) -> None:
        if self._store is None:
            return
        try:
            self._store.set(_beat_key(self.info.rank),
                            f"{time.time():.3f} {self.step} {self.phase_name}")
        except Exception as exc:  # noqa: BLE001 - the store going away is what _give_up reports
            log.debug("heartbeat not written: %s", exc)

    def _check_main_beats(self) -> None:
        """Waiting out rank 0's pause: give up as soon as rank 0 stops beating."""
        age = self._beat_age(0)
        if age is None or age > self.step_limit():
            self._give_up(time.monotonic() - self._progress, self.step_limit(),
                          f"rank 0 is in its {self.phase_name} but ")

    def _beat_age(self, rank: int) -> float | None:
        """Seconds since `rank` last beat; None when the store does not answer."""
        try:
            return time.time() - float(self._store.get(_beat_key(rank)).decode().split()[0])
        except Exception:  # noqa: BLE001
            return None

    def peers(self) -> list[str]:
        """Each other rank that is stale or not waiting in a collective, in words."""
        if self._store is None:
            return []
        out, stale = [], max(3 * self.beat_s, 2.0)
        for rank in range(self.info.world_size):
            if rank == self.info.rank:
                continue
            try:
                if not self._store.check([_beat_key(rank)]):
                    out.append(f"rank {rank} hung: it never sent a heartbeat")
                    continue
                stamp, step, phase = self._store.get(_beat_key(rank)).decode().split(" ", 2)
            except Exception as exc:  # noqa: BLE001 - a store that stopped answering
                out.append(f"the store (on rank 0's node) does not answer: {str(exc)[:200]}")
                break
            age = time.time() - float(stamp)
            if age > stale:
                out.append(f"rank {rank} hung: no heartbeat for {age:.0f}s (last in {phase} at step {step}; "
                           "stopped or dead)")
            elif phase != "collective":
                out.append(f"rank {rank} alive, in {phase} after step {step}")
        return out

    def _give_up(self, stalled: float, limit: float, why: str) -> None:
        try:
            self._report(stalled, limit, why)
        finally:  # exit even when the report cannot be written: a hung job must end
            self._exit(EXIT_CODE)

    def _report(self, stalled: float, limit: float, why: str) -> None:
        peers = self.peers()
        log.error("watchdog: rank %d made no step progress for %.0fs (limit %.0fs): %shung in %s "
                  "after step %d; %s. Exiting with code %d so the worker group restarts "
                  "(resume with --resume latest)", self.info.rank, stalled, limit, why, self.phase_name,
                  self.step, "; ".join(peers) if peers else "no peer looks stuck", EXIT_CODE)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):  # a closed stream must not keep the job alive
                handler.flush()


def main_only(watchdog: Watchdog, info: DistInfo, name: str, key: str, work: Callable[[], Any]) -> Any:
    """Rank 0 does `work` while the other ranks wait for it on the store, not in a collective.

    A collective would time out on a save slower than the collective timeout; the store wait lasts
    as long as rank 0 keeps beating (the watchdog's pause limit). An error on rank 0 ends the others
    too, with the same message.
    """
    with watchdog.phase(name):
        if not info.distributed:
            return work()
        done = f"done/{name}/{key}"
        if info.is_main:
            try:
                result = work()
            except BaseException as exc:
                info.store.set(done, f"error {type(exc).__name__}: {exc}")
                raise
            info.store.set(done, "ok")
            return result
        while not info.store.check([done]):
            time.sleep(0.05)
        status = info.store.get(done).decode()
        if status != "ok":
            raise ClipforgeError(f"rank 0 failed in its {name} after step {key}: "
                                 f"{status.removeprefix('error ')}")
        return None
