"""`clipforge export` / `python -m stages.export`."""

from __future__ import annotations

from collections.abc import Sequence

from stages.common.cli import stage_main
from stages.export.config import ExportConfig


def main(argv: Sequence[str] | None = None) -> int:
    def run(cfg: ExportConfig) -> int:
        from stages.export.runner import run_export  # torch only once the config is valid

        run_export(cfg)
        return 0

    return stage_main("export", ExportConfig, run, argv)
