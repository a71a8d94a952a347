"""run.json: provenance of a run, one entry per stage (config, versions, timings, inputs)."""

from __future__ import annotations

import platform
import socket
import time
from importlib import metadata
from typing import Any

from stages.common import storage
from stages.common.redact import redact

RUN_FILE = "run.json"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the given distributions (absent ones are skipped)."""
    out = {"python": platform.python_version()}
    for name in ("clipforge", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def record_stage(run_dir: str, stage: str, *, config: dict[str, Any], inputs: dict[str, Any],
                 outputs: dict[str, Any], started: float, packages: tuple[str, ...] = ()) -> dict:
    """Add (or replace) this stage's entry in {run_dir}/run.json and return the whole record."""
    uri = storage.join(run_dir, RUN_FILE)
    record = storage.read_json(uri) if storage.exists(uri) else {}
    record.setdefault("run_id", run_dir.rstrip("/").rsplit("/", 1)[-1])
    record.setdefault("stages", {})[stage] = redact({
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        "versions": versions(*packages),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 3),
    })
    storage.write_json(uri, record)
    return record
