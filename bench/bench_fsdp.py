"""--fsdp vs DDP on 2 ranks (CPU, gloo): per-rank parameter + optimizer state and checkpoint saves.

Each case is a real `torchrun --nproc-per-node 2 -m stages.train` run of ViT-B-32 (default) that
saves after every step. Recorded per case: the stage's own per-save log line (seconds the loop
blocked, seconds in the background, file size) and run.json's `state_bytes_per_rank` (rank 0's
parameters and AdamW state). Both cases write the same single `step_<N>.pt`: under --fsdp the full
state is first gathered onto rank 0, which is what the blocking time includes.

    python -m bench fsdp            # ViT-B-32, 4 steps, batch 2 per rank
    python bench/bench_fsdp.py --model clipforge-tiny --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_train import make_data
from bench.common import REPO, write_result

SAVE_LINE = re.compile(r"checkpoint step (\d+) -> \S+ \(([0-9.]+) MB, ([0-9.]+)s in the background, "
                       r"of which ([0-9.]+)s copying; ([0-9.]+)s blocking")


def run_case(model: str, steps: int, fsdp: bool, data: str, root: Path) -> dict:
    name = "fsdp" if fsdp else "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "stages.train", "--model", model, "--train-data", data, "--root", str(root),
           "--run-id", name, "--batch-size", "2", "--workers", "1", "--steps", str(steps),
           "--train-num-samples", "64",
           "--save-every-steps", "1", "--keep-last", "2", "--val-data", "none", "--warmup", "1",
           *(["--fsdp"] if fsdp else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stdout[-2000:] + proc.stderr[-2000:]}
    saves = [{"step": int(m[1]), "mb": float(m[2]), "background_s": float(m[3]), "copy_s": float(m[4]),
              "blocking_s": float(m[5])} for m in SAVE_LINE.finditer(proc.stdout + proc.stderr)]
    outputs = json.loads((root / name / "run.json").read_text())["stages"]["train"]["outputs"]
    return {"saves": saves, "blocking_median_s": statistics.median(s["blocking_s"] for s in saves),
            "background_median_s": statistics.median(s["background_s"] for s in saves),
            "state_bytes_per_rank": outputs["state_bytes_per_rank"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        data = make_data(Path(tmp) / "data", 64, 64, 2)
        cases = {name: run_case(args.model, args.steps, name == "fsdp", data, Path(tmp) / "runs")
                 for name in ("ddp", "fsdp")}
    result = {"model": args.model, "ranks": 2, "device": "cpu", "batch_size_per_rank": 2,
              "steps": args.steps, "cases": cases}
    if all("state_bytes_per_rank" in c for c in cases.values()):
        result["state_ratio_fsdp_over_ddp"] = round(
            cases["fsdp"]["state_bytes_per_rank"] / cases["ddp"]["state_bytes_per_rank"], 4)
    path = write_result("fsdp", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0 if all("error" not in c for c in cases.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
