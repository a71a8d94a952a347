"""The step watchdog in one process (the two-agent hang test is in test_multinode.py)."""

from __future__ import annotations

import logging
import threading
import time

from stages.common.distributed import DistInfo
from stages.train import watchdog as wd


def _watch(timeout: float) -> tuple[wd.Watchdog, list[int], threading.Event]:
    exits, fired = [], threading.Event()

    def record(code: int) -> None:  # os._exit would end the test process
        exits.append(code)
        fired.set()

    return wd.Watchdog(DistInfo(), timeout, exit=record), exits, fired


def test_a_rank_stuck_in_a_phase_logs_it_and_exits_with_code_6(caplog):
    dog, exits, fired = _watch(0.3)
    dog.step_done(1, 0.01)
    dog.enter("data")
    with caplog.at_level(logging.ERROR):
        dog.start()
        try:
            assert fired.wait(10)
        finally:
            dog.stop()
    assert exits[0] == wd.EXIT_CODE == 6
    assert "watchdog: rank 0 made no step progress" in caplog.text and "hung in data after step 1" in caplog.text


def test_steps_that_keep_coming_never_fire_and_a_checkpoint_gets_the_pause_limit():
    dog, exits, fired = _watch(0.3)
    dog.start()
    try:
        for step in range(8):
            time.sleep(0.1)
            dog.step_done(step + 1, 0.1)
        with dog.phase("checkpoint"):  # longer than the step limit, far shorter than the pause limit
            time.sleep(0.8)
        assert not fired.is_set()
    finally:
        dog.stop()
    assert exits == [] and dog.pause_limit() == wd.PAUSE_FLOOR_S


def test_default_limit_follows_the_slowest_recent_step_with_a_floor():
    dog = wd.Watchdog(DistInfo())
    assert dog.step_limit() == wd.AUTO_FLOOR_S * wd.FIRST_STEP_FACTOR  # before the first step
    dog.step_done(1, 0.5)
    assert dog.step_limit() == wd.AUTO_FLOOR_S
    dog.step_done(2, 60.0)
    assert dog.step_limit() == 600.0
