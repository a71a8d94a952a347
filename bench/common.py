"""What every benchmark records: the environment it ran in, and its result JSON in bench/results/."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "open_clip_torch", "webdataset", "pillow")


def environment(packages: tuple[str, ...] = PACKAGES) -> dict:
    """Date, host, CPUs and load, Python, the named distributions' versions, and whether CUDA is up.

    Versions come from package metadata, so nothing is imported (the download image has no torch);
    torch is imported only when it is among `packages`, to ask about CUDA.
    """
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
           "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}
    for name in packages:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in env:
        import torch

        env["cuda"] = torch.cuda.is_available()
        env["torch_threads"] = torch.get_num_threads()
        if env["cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = torch.cuda.device_count()
    return env


def write_result(name: str, result: dict, packages: tuple[str, ...] = PACKAGES) -> Path:
    """bench/results/<name>-<UTC date-time>.json with the environment first."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(packages), **result},
                               indent=2) + "\n")
    return path
