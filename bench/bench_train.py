"""Training throughput: clipforge's trainer vs open_clip_train 3.3.0, and clipforge's checkpoint cost.

1. CPU samples/s of `python -m stages.train` and of open_clip_train (`bench/open_clip_train_ref.py`:
   `open_clip_train.main.main(argv)` with only the fixes listed in bench/open_clip_train_ref.py) for clipforge-tiny (64 px shards)
   and ViT-B-32 (256 px shards): same shards, batch size, fp32, DataLoader workers, steps, LR
   schedule, process count (1, or N under torchrun with gloo). Neither validates; clipforge's
   periodic checkpoints are off (it still writes one at the end, after the timed steps);
   open_clip_train runs with `--logs none`, so it writes no checkpoint at all. Target >= 1.0x.
2. clipforge's checkpoint overhead at its default `--save-every-steps` (1000): the default interval
   is far too long for a CPU run, so one run with `--save-every-steps K` writes a few; per-save
   wall cost = mean time of the timed steps that wrote a checkpoint minus the median time of the
   other timed steps of that run, and overhead = per-save cost / (1000 x that median step time).
   Target < 1%.
3. With CUDA: ViT-B-32 and ViT-B-16, `--precision amp_bf16`, samples/s/GPU and MFU of both trainers
   (FLOPs per sample counted once with clipforge's flop counter, peak from its GPU table).
   Without CUDA it records "gpu": "not available".

Timing (`bench/steptimes.py`): torch's global optimizer post-step hook stamps the end of every
optimizer step in both trainers, so a step's time is everything the trainer does per step (data
wait, forward, backward, update, logging, metrics). Throughput = samples of the steps after
`warmup` / their wall time; the median step time is recorded too (robust to other work on a
shared machine). With repeats, the trainers alternate which goes first (A B B A), so a drift in
the machine's load hits both alike; each run records the load average before and after it.
On CUDA only the first and last timed stamps synchronise the device.
Writes bench/results/train-<date>.json.

    python -m bench.bench_train [--models clipforge-tiny ViT-B-32] [--nproc 1 [2]] [--repeats N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, write_result

# per model: shard image size, batch size per process, steps, untimed warm-up steps,
# runs of each trainer, checkpoint interval for part 2 (sized for ~6 minutes on 2 shared cores)
CPU_MODELS = {
    "clipforge-tiny": {"image_px": 64, "batch_size": 16, "steps": 20, "warmup": 4, "repeats": 2,
                       "ckpt_every": 8},
    "ViT-B-32": {"image_px": 256, "batch_size": 8, "steps": 6, "warmup": 2, "repeats": 2, "ckpt_every": 2},
}
GPU_MODELS = ("ViT-B-32", "ViT-B-16")
TINY_CONFIG = REPO / "stages" / "common" / "model_configs"
RATE = re.compile(r"Batch \(t\): [0-9.]+, ([0-9.e+]+)/s")
DATA_WAIT = re.compile(r"Data \(t\): ([0-9.]+)")
SAVE = re.compile(r"checkpoint step (\d+) -> .*\(([0-9.]+) MB, ([0-9.]+)s")
TARGET_SPEEDUP = 1.0
TARGET_CKPT_PCT = 1.0


@dataclasses.dataclass
class Setting:
    model: str
    image_px: int
    batch_size: int
    steps: int
    warmup: int
    workers: int
    nproc: int = 1
    precision: str = "fp32"
    device: str = "cpu"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.nproc


def default_save_every() -> int:
    from stages.train.config import TrainConfig

    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "save_every_steps")


def make_data(root: Path, image_px: int, samples: int, shards: int) -> str:
    """img2dataset-layout shards of `samples` JPEGs; returns their brace pattern."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from shards import make_shards

    per_shard = math.ceil(samples / shards)
    make_shards(str(root), per_shard * shards, per_shard, image_size=image_px, seed=0)
    return f"{root}/{{00000..{shards - 1:05d}}}.tar"


def common_flags(s: Setting, data: str) -> list[str]:
    return ["--train-data", data, "--train-num-samples", str(s.steps * s.global_batch),
            "--model", s.model, "--batch-size", str(s.batch_size), "--workers", str(s.workers),
            "--precision", s.precision, "--device", s.device, "--lr", "1e-3", "--warmup", "2",
            "--wd", "0.2", "--lr-scheduler", "cosine", "--seed", "0", "--log-every-n-steps", "5"]


def clipforge_argv(s: Setting, data: str, workdir: Path, tag: str, save_every: int = 0) -> list[str]:
    return [*common_flags(s, data), "--steps", str(s.steps), "--val-data", "none",
            "--save-every-steps", str(save_every), "--root", str(workdir / "clipforge-runs"),
            "--run-id", tag]


def open_clip_argv(s: Setting, data: str, tag: str) -> list[str]:
    configs = [a for p in sorted(TINY_CONFIG.glob("*.json")) for a in ("--model-config", str(p))]
    return [*configs, *common_flags(s, data), "--dataset-type", "webdataset", "--epochs", "1",
            "--logs-dir", "none", "--name", tag, "--save-frequency", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--report-to", ""]


def launch(trainer: str, argv: list[str], s: Setting, workdir: Path, tag: str, env: dict) -> dict:
    """Run one trainer under the step timer (torchrun when nproc > 1); its rank-0 stamps and log."""
    module = "stages.train" if trainer == "clipforge" else "bench.open_clip_train_ref"
    out = workdir / f"{tag}.steps"
    timed = ["-m", "bench.steptimes", str(out), module, *argv]
    if s.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(s.nproc), *timed]
    else:
        cmd = [sys.executable, *timed]
    log = workdir / f"{tag}.log"
    env = dict(env, BENCH_SYNC_STEPS=f"{s.warmup},{s.steps}")
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    with log.open("wb") as f:
        proc = subprocess.run(cmd, env=env, cwd=workdir, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    wall = time.monotonic() - start
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{tag}: {trainer} exited {proc.returncode}:\n{text[-3000:]}")
    stamps = json.loads(Path(f"{out}.rank0.json").read_text())["stamps"]
    if len(stamps) != s.steps:
        raise RuntimeError(f"{tag}: {trainer} made {len(stamps)} optimizer steps, expected {s.steps}")
    return {"stamps": stamps, "log": text, "wall_s": wall, "load_avg_1m": load}


def throughput(stamps: list[float], s: Setting) -> dict:
    """Samples/s over the steps after warm-up: whole window, and from the median step time."""
    window = stamps[-1] - stamps[s.warmup - 1]
    timed = s.steps - s.warmup
    steps = [stamps[i] - stamps[i - 1] for i in range(s.warmup, s.steps)]
    median = statistics.median(steps)
    return {"timed_steps": timed, "window_s": round(window, 3),
            "samples_per_s": round(timed * s.global_batch / window, 2),
            "samples_per_s_per_process": round(timed * s.global_batch / window / s.nproc, 2),
            "median_step_s": round(median, 4),
            "samples_per_s_median": round(s.global_batch / median, 2),
            "step_s": [round(x, 4) for x in steps]}


def self_reported(log: str, pattern: re.Pattern = RATE) -> float | None:
    """Median of a value the trainer logs itself (samples/s, data wait), leaving out its first line."""
    values = [float(v) for v in pattern.findall(log)][1:]
    return round(statistics.median(values), 4) if values else None


def compare(s: Setting, data: str, workdir: Path, env: dict, repeats: int) -> dict:
    """Both trainers on the same setting, alternating which goes first on each repeat."""
    runs: dict[str, list[dict]] = {"open_clip_train": [], "clipforge": []}
    for r in range(repeats):
        order = ("open_clip_train", "clipforge") if r % 2 == 0 else ("clipforge", "open_clip_train")
        for trainer in order:
            tag = f"{trainer}-{s.model}-{s.nproc}p-r{r}"
            argv = (clipforge_argv(s, data, workdir, tag) if trainer == "clipforge"
                    else open_clip_argv(s, data, tag))
            res = launch(trainer, argv, s, workdir, tag, env)
            run = throughput(res["stamps"], s) | {"wall_s_process": round(res["wall_s"], 1),
                                                  "load_avg_1m_before_after": res["load_avg_1m"],
                                                  "self_reported_samples_per_s": self_reported(res["log"]),
                                                  "self_reported_data_wait_s": self_reported(res["log"], DATA_WAIT)}
            runs[trainer].append(run)
            print(f"  {s.model:15s} {s.nproc}p {trainer:16s} {run['samples_per_s']:9.2f} samples/s "
                  f"(median step {run['median_step_s']:.3f}s)", flush=True)
    out: dict = {"setting": dataclasses.asdict(s)}
    for trainer, rs in runs.items():
        med = {key: round(statistics.median(r[key] for r in rs), 4) for key in
               ("samples_per_s", "samples_per_s_per_process", "samples_per_s_median", "median_step_s")}
        out[trainer] = {"samples_per_s": med["samples_per_s"],
                        "samples_per_s_per_process": med["samples_per_s_per_process"],
                        "samples_per_s_median_step": med["samples_per_s_median"],
                        "median_step_s": med["median_step_s"], "runs": rs}
    cf, oc = out["clipforge"], out["open_clip_train"]
    out["speedup"] = round(cf["samples_per_s"] / oc["samples_per_s"], 3)
    out["speedup_median_step"] = round(cf["samples_per_s_median_step"] / oc["samples_per_s_median_step"], 3)
    return out


def checkpoint_overhead(s: Setting, every: int, data: str, workdir: Path, env: dict, default_every: int) -> dict:
    """clipforge with --save-every-steps `every`: the wall cost of a save, scaled to the default interval."""
    tag = f"clipforge-{s.model}-ckpt{every}"
    res = launch("clipforge", clipforge_argv(s, data, workdir, tag, save_every=every), s, workdir, tag, env)
    stamps = res["stamps"]
    # the checkpoint after step k is written before step k+1 ends, so it lands in step k+1's time
    step_s = {k + 1: stamps[k] - stamps[k - 1] for k in range(s.warmup, s.steps)}
    saved_in = {k + 1 for k in range(every, s.steps, every) if k + 1 in step_s}
    plain = [v for k, v in step_s.items() if k not in saved_in]
    with_save = [step_s[k] for k in sorted(saved_in)]
    if not with_save or not plain:
        raise RuntimeError(f"{tag}: need timed steps with and without a checkpoint; change steps/ckpt_every")
    step_time = statistics.median(plain)
    per_save = statistics.mean(with_save) - step_time
    logged = [{"step": int(st), "mb": float(mb), "seconds": float(sec)} for st, mb, sec in SAVE.findall(res["log"])]
    mean_logged = statistics.mean(x["seconds"] for x in logged) if logged else None
    print(f"  {s.model:15s} checkpoint every {every}: {per_save:.3f}s per save, step {step_time:.3f}s", flush=True)
    return {
        "save_every_steps": every, "saves_timed": len(with_save),
        "steps_with_save_s": [round(x, 4) for x in with_save],
        "steps_without_save_s": [round(x, 4) for x in plain],
        "median_step_s": round(step_time, 4),
        "per_save_wall_s": round(per_save, 4),
        "per_save_logged": logged,
        "checkpoint_mb": logged[0]["mb"] if logged else None,
        "load_avg_1m": res["load_avg_1m"],
        "default_save_every_steps": default_every,
        "overhead_pct_at_default": round(100 * per_save / (default_every * step_time), 4),
        "overhead_pct_at_default_logged": round(100 * mean_logged / (default_every * step_time), 4)
        if logged else None,
        f"overhead_pct_at_every_{every}": round(100 * per_save / (every * step_time), 2),
        "how": f"overhead_pct_at_default = per-save wall cost / ({default_every} x median step time); "
               "per-save wall cost = mean time of the timed steps that wrote a checkpoint - median time "
               "of the other timed steps of the same run (a step's time runs from one optimizer step's "
               "end to the next's, so it includes the save); _logged uses the seconds clipforge logs "
               "for each save (all saves, the final one too) instead",
    }


def gpu_part(args, workdir: Path, env: dict) -> dict:
    import open_clip
    import torch

    from stages.train.metrics import flops_per_sample, peak_flops

    peak = peak_flops(torch.device("cuda", 0), 0.0)
    results: dict = {"device": torch.cuda.get_device_name(0), "peak_flops": peak, "models": {}}
    samples = args.gpu_steps * args.gpu_batch_size + args.gpu_batch_size
    data = make_data(workdir / "gpu-shards", 256, samples, max(2 * args.gpu_workers, 8))
    for model in args.gpu_models:
        net = open_clip.create_model(model, output_dict=True)
        flops = flops_per_sample(net, net.visual.image_size, net.context_length)
        del net
        s = Setting(model, 256, args.gpu_batch_size, args.gpu_steps, args.gpu_warmup, args.gpu_workers,
                    precision="amp_bf16", device="cuda")
        res = compare(s, data, workdir, env, 1)
        for trainer in ("open_clip_train", "clipforge"):
            rate = res[trainer]["samples_per_s_per_process"]
            res[trainer]["mfu"] = round(flops * rate / peak, 4) if peak else None
        res["train_flops_per_sample"] = flops
        results["models"][model] = res
    return results


def table(cpu: dict, ckpt: dict, gpu: dict | str) -> str:
    rows = [f"{'model':15s} {'proc':>4s} {'open_clip_train':>16s} {'clipforge':>10s} {'ratio':>6s} "
            f"{'(median-step ratio)':>20s}"]
    for r in cpu.values():
        rows.append(f"{r['setting']['model']:15s} {r['setting']['nproc']:4d} "
                    f"{r['open_clip_train']['samples_per_s']:16.2f} {r['clipforge']['samples_per_s']:10.2f} "
                    f"{r['speedup']:6.3f} {r['speedup_median_step']:20.3f}")
    rows.append("samples/s, CPU fp32; ratio = clipforge / open_clip_train (target >= 1.0)")
    for model, c in ckpt.items():
        rows.append(f"checkpoint {model}: {c['per_save_wall_s']:.3f}s per save ({c['checkpoint_mb']} MB), "
                    f"step {c['median_step_s']:.3f}s -> {c['overhead_pct_at_default']:.3f}% "
                    f"every {c['default_save_every_steps']} steps (target < 1%)")
    if isinstance(gpu, str):
        rows.append(f"gpu: {gpu}")
    else:
        for model, r in gpu["models"].items():
            rows.append(f"GPU {model}: open_clip_train {r['open_clip_train']['samples_per_s_per_process']:.1f}/s/GPU "
                        f"MFU {r['open_clip_train']['mfu']}, clipforge "
                        f"{r['clipforge']['samples_per_s_per_process']:.1f}/s/GPU MFU {r['clipforge']['mfu']}, "
                        f"ratio {r['speedup']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CPU_MODELS), choices=list(CPU_MODELS))
    parser.add_argument("--nproc", nargs="+", type=int, default=[1], help="process counts (>1: torchrun, gloo)")
    parser.add_argument("--batch-size", type=int, help="per process (default: per model, see CPU_MODELS)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: per model)")
    parser.add_argument("--warmup-steps", type=int, help="untimed first steps (default: per model)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each trainer process (torchrun sets 1 anyway)")
    parser.add_argument("--repeats", type=int,
                        help="runs of each trainer per setting, alternating which goes first (default: per model)")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip part 2")
    parser.add_argument("--workdir", help="keep shards, logs and step stamps here (default: a temporary folder)")
    parser.add_argument("--gpu-models", nargs="+", default=list(GPU_MODELS))
    parser.add_argument("--gpu-batch-size", type=int, default=128)
    parser.add_argument("--gpu-steps", type=int, default=40)
    parser.add_argument("--gpu-warmup", type=int, default=10)
    parser.add_argument("--gpu-workers", type=int, default=8)
    args = parser.parse_args(argv)
    import torch

    gpu_env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env = dict(gpu_env, CUDA_VISIBLE_DEVICES="")  # part 1 and 2 run on the CPU, GPU or not
    default_every = default_save_every()
    cpu: dict = {}
    ckpt: dict = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        for model in args.models:
            spec = CPU_MODELS[model]
            batch = args.batch_size or spec["batch_size"]
            steps = args.steps or spec["steps"]
            warmup = args.warmup_steps or spec["warmup"]
            most = max(args.nproc)
            shards = max(4, 2 * most * args.workers)
            data = make_data(workdir / f"shards-{spec['image_px']}", spec["image_px"],
                             (steps + 1) * batch * most, shards)
            for nproc in args.nproc:
                s = Setting(model, spec["image_px"], batch, steps, warmup, args.workers, nproc)
                cpu[f"{model}/{nproc}p"] = compare(s, data, workdir, env, args.repeats or spec["repeats"])
            if not args.no_checkpoint:
                s = Setting(model, spec["image_px"], batch, steps, warmup, args.workers, 1)
                ckpt[model] = checkpoint_overhead(s, spec["ckpt_every"], data, workdir, env, default_every)
        if torch.cuda.is_available():
            gpu: dict | str = gpu_part(args, workdir, gpu_env)
        else:
            gpu = "not available"
    config = vars(args) | {"cpu_models": {m: CPU_MODELS[m] for m in args.models},
                                                       "lr": 1e-3, "lr_warmup": 2, "wd": 0.2, "precision": "fp32",
                                                       "elapsed_s": round(time.monotonic() - started, 1)}
    result = {"config": config, "cpu": cpu, "checkpoint": ckpt, "gpu": gpu,
              "targets": {"speedup": f">= {TARGET_SPEEDUP}", "checkpoint_overhead_pct": f"< {TARGET_CKPT_PCT}"},
              "met": {"speedup": all(r["speedup"] >= TARGET_SPEEDUP for r in cpu.values()),
                      "checkpoint": all(c["overhead_pct_at_default"] < TARGET_CKPT_PCT for c in ckpt.values())}}
    print(table(cpu, ckpt, gpu))
    print(f"-> {write_result('train', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
