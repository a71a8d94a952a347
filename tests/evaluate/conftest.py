"""Eval fixtures: a micro CLIP trained a few steps on coloured squares, saved as a run's checkpoint."""

from __future__ import annotations

import pytest
from evalkit import save_checkpoint, train_micro


@pytest.fixture(scope="session")
def trained_micro():
    return train_micro()


@pytest.fixture
def micro_run(trained_micro, tmp_path):
    """A run folder with checkpoints/step_60.pt and LATEST of the trained micro model."""
    run_dir = str(tmp_path / "runs" / "r1")
    save_checkpoint(trained_micro, run_dir)
    return run_dir
