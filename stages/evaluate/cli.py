"""`clipforge evaluate` / `python -m stages.evaluate`."""

from __future__ import annotations

from collections.abc import Sequence

from stages.common.cli import stage_main
from stages.evaluate.config import EvaluateConfig


def main(argv: Sequence[str] | None = None) -> int:
    def run(cfg: EvaluateConfig) -> int:
        from stages.evaluate.runner import run_evaluate  # torch only once the config is valid

        run_evaluate(cfg)
        return 0

    return stage_main("evaluate", EvaluateConfig, run, argv)
