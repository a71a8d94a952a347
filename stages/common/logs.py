"""Logging that carries the stage, run id and rank; progress display on a terminal."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from stages.common.redact import redact_text

T = TypeVar("T")

FORMAT = "%(asctime)s %(levelname)s [%(stage)s run=%(run_id)s rank=%(rank)s] %(name)s: %(message)s"


class _RedactingFormatter(logging.Formatter):
    """Log lines go to pod logs and log stores: no credentials, presigned queries or internal hosts."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class _ContextFilter(logging.Filter):
    def __init__(self, stage: str, run_id: str, rank: int):
        super().__init__()
        self.stage, self.run_id, self.rank = stage, run_id, rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.stage, record.run_id, record.rank = self.stage, self.run_id, self.rank
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged, not the stream it was at set-up
    (a stage run in-process, by a notebook or a test harness, may have swapped and closed it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(stage: str, run_id: str, rank: int = 0, level: str = "INFO") -> logging.Logger:
    """Configure the root logger once per process; every line names the stage, run and rank."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.addFilter(_ContextFilter(stage, run_id, rank))
    handler.setFormatter(_RedactingFormatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "aiobotocore", "s3fs", "urllib3", "fsspec", "PIL", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return logging.getLogger(f"clipforge.{stage}")


def progress(items: Iterable[T], total: int | None, desc: str, log: logging.Logger,
             every_s: float = 30.0) -> Iterator[T]:
    """A progress bar on a terminal; elsewhere (pods, CI) a log line every `every_s` seconds."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, file=sys.stderr)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s (%.1f/s)", desc, done, of, done / max(now - start, 1e-9))
