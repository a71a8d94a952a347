"""Checkpoint saves: how long the training loop blocks per save, and the peak memory while saving.

For clipforge-tiny and ViT-B-32 (fp32, AdamW state after one step, CPU, local store), two ways:

- before: the synchronous save the trainer used to do (clipforge 59da919): `torch.save` of the
  whole state into a BytesIO, `getvalue()` (a second copy), one write, LATEST; the loop waits
  for all of it.
- after: stages.train.checkpoint_manager.CheckpointManager.save: a CPU snapshot on the loop, then
  the background writer streams torch.save to the store and writes LATEST.

Each (model, way) runs in its own process: `saves` saves, each followed by one real training step
(forward, backward, AdamW step on random inputs; bench_train's batch sizes). Blocking = the time
the loop waits: before, the whole save; after, the save call (gathering) plus what the next
optimizer step waits for the snapshot (`snapshot_copy_s`: the copy itself, the blocking if the
step came at once). Peak RSS = the largest VmRSS a 2 ms sampler saw during the saves, minus the
RSS before the first one.
Writes bench/results/checkpoint-<date>.json. Target: <= 1 s blocking per ViT-B-32 save.

    python -m bench.bench_checkpoint [--models clipforge-tiny ViT-B-32] [--saves 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.common import REPO, write_result

TARGET_BLOCKING_S = 1.0
BATCH = {"clipforge-tiny": 16, "ViT-B-32": 8}  # per step, as bench_train's CPU settings


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _trained_state(model_name: str):
    import open_clip
    import torch

    from stages.common.models import register_builtin_configs
    from stages.train.config import TrainConfig
    from stages.train.optim import create_optimizer

    register_builtin_configs()
    model = open_clip.create_model(model_name)
    cfg = TrainConfig(model=model_name, train_data="none", keep_last=0)
    optimizer = create_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments exist, as in any checkpoint after step 1
    for p in model.parameters():
        p.grad = None
    return model, optimizer, cfg


def _save_before(ckpt_dir: str, step: int, model, optimizer, cfg) -> None:
    """The trainer's save before the checkpoint manager (rank 0 blocks for all of it)."""
    import hashlib

    import torch

    from stages.common import storage

    state = {"format": "clipforge.checkpoint/1", "step": step,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scaler": None, "config": {"model": cfg.model}}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    uri = storage.join(ckpt_dir, f"step_{step}.pt")
    storage.write_bytes(uri, data)
    storage.write_json(storage.join(ckpt_dir, "LATEST"), {"step": step, "uri": uri,
                                                          "sha256": hashlib.sha256(data).hexdigest()})


class _DataPosition:
    def state_dict(self) -> dict:
        return {"epoch": 0, "batches": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def _manager(root: str, model, optimizer, cfg):
    import torch

    from stages.common.distributed import DistInfo
    from stages.train.checkpoint_manager import CheckpointManager
    from stages.train.metrics import TrainMetrics
    from stages.train.optim import Schedule
    from stages.train.rng import RNGState
    from stages.train.runner import Progress, _ModelState, _ScheduleState

    cfg.root, cfg.run_id = root, "bench"
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    manager = CheckpointManager(cfg, info, TrainMetrics("bench", 0))
    progress = Progress()
    schedule = Schedule(optimizer, cfg, global_batch=1, epoch_samples=1000)
    schedule.set_horizon(1000)
    manager.replicated = {"model": _ModelState(model), "optimizer": optimizer,
                          "scheduler": _ScheduleState(schedule, progress), "progress": progress}
    manager.per_rank = {"data": _DataPosition(), "rng": RNGState()}
    manager.meta = {"model_name": cfg.model, "model_cfg": None, "preprocess_cfg": {}}
    return manager, progress


def _train_step(model, optimizer, batch_size: int) -> None:
    """One real optimizer step on random inputs: what the loop does between two saves."""
    import open_clip
    import torch

    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch_size, 3, *size)
    texts = torch.randint(0, model.vocab_size, (batch_size, model.context_length))
    optimizer.zero_grad()
    image_features, text_features, logit_scale = model(images, texts)[:3]
    open_clip.ClipLoss()(image_features, text_features, logit_scale).backward()
    optimizer.step()


def one(model_name: str, way: str, saves: int, batch_size: int) -> dict:
    """Run in a child process: `saves` saves of one model one way, a training step after each."""
    model, optimizer, cfg = _trained_state(model_name)
    blocking, copying, total = [], [], []
    with tempfile.TemporaryDirectory(prefix="clipforge-bench-ckpt-") as root:
        manager, progress = (_manager(root, model, optimizer, cfg) if way == "after" else (None, None))
        if manager is not None:
            manager.guard(optimizer)
        before_rss = _rss()
        with PeakRSS() as peak:
            for i in range(1, saves + 1):
                start = time.perf_counter()
                if manager is None:
                    _save_before(f"{root}/bench/checkpoints", i, model, optimizer, cfg)
                    blocking.append(time.perf_counter() - start)
                    _train_step(model, optimizer, batch_size)
                else:
                    progress.step = i
                    manager.save(i, epoch_done=False)
                    _train_step(model, optimizer, batch_size)  # its optimizer.step() waits for the copy
                    blocking.append(manager.blocked)
                    manager.wait()
                    copying.append(manager.snapshot_seconds)
                total.append(time.perf_counter() - start)
        if manager is not None:
            manager.close()
        size = os.path.getsize(f"{root}/bench/checkpoints/step_{saves}.pt")
    case = {"model": model_name, "way": way, "bytes": size, "blocking_s": [round(b, 3) for b in blocking],
            "blocking_median_s": round(statistics.median(blocking), 3),
            "save_and_step_s": [round(t, 3) for t in total],
            "rss_before_bytes": before_rss, "peak_rss_bytes": peak.peak,
            "peak_rss_over_before_bytes": peak.peak - before_rss}
    if copying:  # the blocking a save would cost if the next optimizer step came at once
        case["snapshot_copy_s"] = [round(c, 3) for c in copying]
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["clipforge-tiny", "ViT-B-32"])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.saves, BATCH[args.one[0]])), flush=True)
        return 0
    cases = []
    for model in args.models:
        for way in ("before", "after"):
            out = subprocess.run([sys.executable, "-m", "bench.bench_checkpoint", "--one", model, way,
                                  "--saves", str(args.saves)], cwd=REPO, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"bench checkpoint: {model} {way} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            case = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(case), flush=True)
            cases.append(case)
    vit = [c for c in cases if c["model"] == "ViT-B-32" and c["way"] == "after"]
    result = {"target_blocking_s": TARGET_BLOCKING_S, "cases": cases,
              "vit_b_32_meets_target": bool(vit) and vit[0]["blocking_median_s"] <= TARGET_BLOCKING_S}
    path = write_result("checkpoint", result)
    print(f"bench checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
