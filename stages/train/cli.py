"""`clipforge train` / `python -m stages.train`."""

from __future__ import annotations

from collections.abc import Sequence

from stages.common.cli import stage_main
from stages.train.config import TrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    from stages.train.runner import run

    return stage_main("train", TrainConfig, run, argv)
