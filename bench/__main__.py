"""`python -m bench [name ...]`: run the named benchmarks (default: all of bench/bench_*.py)."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def run(name: str) -> int:
    module = importlib.import_module(f"bench.bench_{name}")
    if not hasattr(module, "main"):
        print(f"bench: bench_{name}.py defines no main(); skipped", file=sys.stderr)
        return 0
    print(f"== bench {name}", flush=True)
    start = time.monotonic()
    code = module.main([]) or 0
    print(f"== bench {name}: exit {code} after {time.monotonic() - start:.0f}s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    failed = [n for n in names if run(n) != 0]
    if failed:
        print(f"bench: failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
