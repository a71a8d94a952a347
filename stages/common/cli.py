"""The shape every stage's command shares: parse config, maybe only check it, run, report errors."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from stages.common.config import parse_config, print_config
from stages.common.errors import ClipforgeError
from stages.common.redact import redact_text

C = TypeVar("C")


def stage_main(name: str, config_cls: type[C], run: Callable[[C], object],
               argv: Sequence[str] | None = None) -> int:
    """Entry point body for `clipforge <name>` / `python -m stages.<name>`; returns an exit code.

    Errors a user can act on (ClipforgeError) print one clear line, without a traceback.
    """
    try:
        cfg, check_only = parse_config(config_cls, argv, prog=f"clipforge {name}")
        if check_only:
            if hasattr(cfg, "check_inputs"):  # looks at the data, which validate() never does
                cfg.check_inputs()
            print_config(cfg)
            return 0
        result = run(cfg)
        return result if isinstance(result, int) else 0
    except ClipforgeError as exc:
        print(f"clipforge {name}: error: {redact_text(str(exc))}", file=sys.stderr)  # pod logs are public-ish
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"clipforge {name}: interrupted", file=sys.stderr)
        return 130
