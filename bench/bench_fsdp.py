"""--fsdp vs DDP on 2 ranks (CPU, gloo): per-rank state, and checkpoint saves, sharded vs single-file.

Each case is a real `torchrun --nproc-per-node 2 -m stages.train` run of ViT-B-32 (default) that
saves after every step:
- ddp: DDP, one step_<N>.pt written by rank 0;
- fsdp-single: --fsdp --checkpoint-format single, the full state gathered onto rank 0, one file;
- fsdp-sharded: --fsdp (sharded is its default), each rank's shard written through
  torch.distributed.checkpoint's async_save into step_<N>/.
Recorded per case: the stage's own per-save log line (seconds the loop blocked, seconds in the
background, size; "of which" is the snapshot copy for single files, DCP's write for sharded
ones), the first save's blocking time (no earlier write to wait for), run.json's
`state_bytes_per_rank`, and the load average before and after (the machine may be shared).

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

SAVE_LINE = re.compile(r"checkpoint step (\d+) -> \S+ \(([0-9.]+) MB(?: sharded)?, ([0-9.]+)s in the "
                       r"background, of which ([0-9.]+)s (?:copying|DCP's write); ([0-9.]+)s blocking")
CASES = {"ddp": [], "fsdp-single": ["--fsdp", "--checkpoint-format", "single"], "fsdp-sharded": ["--fsdp"]}


def run_case(model: str, steps: int, name: str, data: str, root: Path) -> dict:
    load_before = round(os.getloadavg()[0], 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "stages.train", "--model", model, "--train-data", data, "--root", str(root),
           "--run-id", name, "--batch-size", "2", "--workers", "1", "--steps", str(steps),
           "--train-num-samples", "64",
           "--save-every-steps", "1", "--keep-last", "2", "--val-data", "none", "--warmup", "1",
           *CASES[name]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stdout[-2000:] + proc.stderr[-2000:]}
    saves = [{"step": int(m[1]), "mb": float(m[2]), "background_s": float(m[3]), "of_which_s": float(m[4]),
              "blocking_s": float(m[5])} for m in SAVE_LINE.finditer(proc.stdout + proc.stderr)]
    outputs = json.loads((root / name / "run.json").read_text())["stages"]["train"]["outputs"]
    saves.sort(key=lambda s: s["step"])
    return {"args": CASES[name], "saves": saves, "first_save_blocking_s": saves[0]["blocking_s"],
            "blocking_median_s": statistics.median(s["blocking_s"] for s in saves),
            "background_median_s": statistics.median(s["background_s"] for s in saves),
            "state_bytes_per_rank": outputs["state_bytes_per_rank"],
            "load_avg_1m_before": load_before, "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        data = make_data(Path(tmp) / "data", 64, 64, 2)
        cases = {name: run_case(args.model, args.steps, name, data, Path(tmp) / "runs") for name in CASES}
    result = {"model": args.model, "ranks": 2, "device": "cpu", "batch_size_per_rank": 2,
              "steps": args.steps, "cases": cases}
    if all("state_bytes_per_rank" in c for c in cases.values()):
        result["state_ratio_fsdp_over_ddp"] = round(
            cases["fsdp-sharded"]["state_bytes_per_rank"] / cases["ddp"]["state_bytes_per_rank"], 4)
        result["first_save_blocking_s"] = {n: c["first_save_blocking_s"] for n, c in cases.items()}
        result["background_median_s"] = {n: c["background_median_s"] for n, c in cases.items()}
    path = write_result("fsdp", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0 if all("error" not in c for c in cases.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
