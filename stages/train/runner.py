"""The train stage end to end: set up (model, data, optimizer, resume), the step loop, the finish."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from stages.common import runinfo
from stages.common.config import to_dict
from stages.common.distributed import (
    DistInfo,
    agree_run_id,
    collective_timeout,
    init_distributed,
    shutdown,
    wrap_ddp,
)
from stages.common.errors import ConfigError, DataError
from stages.common.logs import setup_logging
from stages.train import fsdp, optim, sharded_checkpoint, zeroshot
from stages.train.checkpoint_manager import CheckpointManager
from stages.train.config import TrainConfig
from stages.train.loop import NonFiniteGuard, StepOutcome, TrainStep, step_groups
from stages.train.loss import create_loss
from stages.train.metrics import TrainMetrics, flops_per_sample, peak_flops
from stages.train.model import ModelBundle, build_distill_model, build_model, maybe_compile, sync_batchnorm
from stages.train.reporting import Reporters
from stages.train.rng import RNGState
from stages.train.validate import evaluate
from stages.train.watchdog import Watchdog, main_only

log = logging.getLogger("clipforge.train")


@dataclasses.dataclass
class Progress:
    """Where training stands; Stateful, saved with each checkpoint."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0           # all ranks, since the start of the run
    epoch_samples: int | None = 0   # all ranks, in the current epoch (None: unknown, a format-1 resume)
    nonfinite_total: int = 0
    world_size: int = 1
    global_batch_size: int = 0      # samples per optimizer step, all ranks

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                "epoch_samples": self.epoch_samples, "nonfinite_steps": self.nonfinite_total,
                "world_size": self.world_size, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.samples_seen = int(state.get("samples_seen", 0))
        self.epoch_samples = state.get("epoch_samples")
        self.nonfinite_total = int(state.get("nonfinite_steps", 0))
        self.world_size = int(state.get("world_size") or 0)
        self.global_batch_size = int(state.get("global_batch_size") or 0)


class _ModelState:
    """The unwrapped model as a Stateful (DDP/compile wrappers add key prefixes)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class _ScheduleState:
    """The LR schedule's Stateful, saved at the current step."""

    def __init__(self, schedule: optim.Schedule, progress: Progress):
        self.schedule, self.progress = schedule, progress

    def state_dict(self) -> dict:
        return self.schedule.state_dict(self.progress.step)

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)


@dataclasses.dataclass
class Session:
    cfg: TrainConfig
    info: DistInfo
    bundle: ModelBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    scheduler: optim.Schedule
    loss_fn: Any
    data: Any
    val_data: Any
    steps_per_epoch: int
    total_steps: int
    progress: Progress
    metrics: TrainMetrics
    checkpoints: CheckpointManager
    loaded_from: str | None = None
    flops_per_sample: float = 0.0
    peak_flops: float = 0.0
    reporters: Any = None
    last_val: dict = dataclasses.field(default_factory=dict)
    last_loss: float | None = None
    watchdog: Watchdog | None = None
    teacher: Any = None
    zeroshot_sets: list = dataclasses.field(default_factory=list)

    @property
    def step_samples(self) -> int:
        return self.cfg.batch_size * self.cfg.accum_freq * self.info.world_size

    def steps_left_in_epoch(self) -> int:
        return max(0, self.steps_per_epoch - self.progress.epoch_samples // self.step_samples)


def run(cfg: TrainConfig) -> int:
    started = time.time()
    info = init_distributed(cfg.device, collective_timeout(_collective_timeout_s(cfg)), backend=cfg.dist_backend,
                            url=cfg.dist_url, same_device=cfg.no_set_device_rank)
    cfg.run_id = agree_run_id(cfg.run_id, cfg.run_id_given, info)
    logs_here = info.is_main or (cfg.log_local and info.local_rank == 0)
    setup_logging("train", cfg.run_id, info.rank, cfg.log_level if logs_here else "WARNING")
    metrics = TrainMetrics(cfg.run_id, info.rank)
    metrics.serve(cfg.metrics_port, cfg.metrics_addr, info.local_rank)
    watchdog = Watchdog(info, cfg.step_timeout).start()
    manager = CheckpointManager(cfg, info, metrics)
    try:
        session = setup(cfg, info, metrics, manager)
        session.watchdog = watchdog
        train(session)
        finish(session, started)
        manager.close()
        return 0
    except BaseException:
        manager.close_after_error()  # a write in flight still completes, so LATEST loses nothing
        raise
    finally:
        watchdog.stop()
        metrics.stage.stop()
        shutdown()


def _collective_timeout_s(cfg: TrainConfig) -> float:
    """Twice the step limit, so the watchdog (which names the hung rank) speaks first."""
    return max(60.0, 2 * cfg.step_timeout) if cfg.step_timeout else 600.0


def setup(cfg: TrainConfig, info: DistInfo, metrics: TrainMetrics, manager: CheckpointManager) -> Session:
    from stages.train.sources import get_train_data, get_val_data

    cfg.check_inputs(info.world_size)  # the first samples are usable, before any model is built
    ckpt = manager.load()
    progress = Progress()
    if ckpt:
        progress.load_state_dict(ckpt.trainer["progress"])
    bundle = build_model(cfg, info.device, info.rank)
    flops = _count_flops(bundle) if info.is_main else 0.0  # on the whole model, before any sharding
    if cfg.fsdp and info.distributed:
        fsdp.shard(bundle.model, cfg.precision)
    elif cfg.fsdp:
        log.info("--fsdp in one process: nothing to shard, the model is trained whole")
    data = get_train_data(cfg, bundle.preprocess_train, bundle.tokenizer, rank=info.rank,
                          world_size=info.world_size, epoch=progress.epoch)
    steps_per_epoch = data.num_batches // cfg.accum_freq
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--train-data {cfg.train_data}: {data.num_batches} batches per rank per epoch, but one "
            f"optimizer step needs --accum-freq {cfg.accum_freq} of them; use more data or a smaller "
            "--batch-size/--accum-freq")
    optimizer = optim.create_optimizer(bundle.model, cfg)
    scaler = torch.amp.GradScaler(device=info.device.type) if cfg.precision == "amp" else None
    step_samples = cfg.batch_size * cfg.accum_freq * info.world_size
    schedule = optim.Schedule(optimizer, cfg, global_batch=step_samples,
                              epoch_samples=steps_per_epoch * step_samples)
    model_state = fsdp.ShardedModelState(bundle.model) if cfg.fsdp else _ModelState(bundle.model)
    manager.replicated = {"model": model_state,
                          "optimizer": fsdp.OptimizerState(bundle.model, optimizer, sharded=cfg.fsdp),
                          "scheduler": _ScheduleState(schedule, progress), "progress": progress}
    if scaler is not None:
        manager.replicated["scaler"] = scaler
    manager.per_rank = {"data": data, "rng": RNGState()}
    manager.sharded = sharded_checkpoint.ShardedState(bundle.model, optimizer)
    manager.guard(optimizer)
    manager.meta = {"model_name": bundle.model_name, "model_cfg": bundle.model_cfg,
                    "preprocess_cfg": bundle.preprocess_cfg}
    if ckpt:
        saved_layout = (progress.world_size, progress.global_batch_size, ckpt.config)
        manager.restore(ckpt)
        if progress.epoch_samples is None:  # format 1: the same layout, so steps measure it
            progress.epoch_samples = (progress.step - progress.epoch * steps_per_epoch) * step_samples
        if ckpt.format == "open_clip_train":  # it counts epochs: epoch N starts at N x steps per epoch
            progress.step = ckpt.epoch * steps_per_epoch
            progress.samples_seen = progress.step * step_samples
            log.info("open_clip_train checkpoint of epoch %d: continuing at step %d", ckpt.epoch, progress.step)
    progress.world_size, progress.global_batch_size = info.world_size, step_samples
    total_steps = _plan_total(cfg, progress, schedule, steps_per_epoch, step_samples)
    if ckpt:
        log.info("resumed from %s at step %d (epoch %d)", ckpt.uri, progress.step, progress.epoch)
        _log_layout_change(cfg, info, saved_layout, schedule, total_steps - progress.step)
    if cfg.use_bn_sync and info.distributed:
        bundle.model = sync_batchnorm(bundle.model, info.device)
    wrapped = bundle.model if cfg.fsdp else wrap_ddp(bundle.model, info, cfg.ddp_static_graph)
    model = maybe_compile(wrapped, cfg.torchcompile)
    val_data = None
    if cfg.has_val:  # DDP: every rank validates its part; --fsdp: all of it (its forward needs every rank)
        val_data = get_val_data(cfg, bundle.preprocess_val, bundle.tokenizer, rank=0 if cfg.fsdp else info.rank,
                                world_size=1 if cfg.fsdp else info.world_size)
    session = Session(cfg=cfg, info=info, bundle=bundle, model=model, optimizer=optimizer, scaler=scaler,
                      scheduler=schedule, loss_fn=create_loss(cfg, info), data=data, val_data=val_data,
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps, progress=progress,
                      metrics=metrics, checkpoints=manager, loaded_from=ckpt.uri if ckpt else None,
                      teacher=build_distill_model(cfg, info.device), flops_per_sample=flops)
    _setup_reporting(session)
    session.zeroshot_sets = zeroshot.open_sets(cfg)
    return session


def _plan_total(cfg: TrainConfig, p: Progress, schedule: optim.Schedule, steps_per_epoch: int,
                step_samples: int) -> int:
    """Total optimizer steps in this layout, so the run trains the samples/epochs the flags ask for.

    --steps counts steps of the schedule's reference global batch (the first run's); --epochs
    counts whole epochs. Either way the LR horizon is the same number of samples.
    """
    if cfg.steps:
        total_samples = cfg.steps * schedule.ref_batch
        total = p.step + max(0, -(-(total_samples - p.samples_seen) // step_samples))
    else:
        left_in_epoch = max(0, steps_per_epoch - (p.epoch_samples or 0) // step_samples)
        total = p.step + left_in_epoch + max(0, cfg.epochs - p.epoch - 1) * steps_per_epoch
        total_samples = p.samples_seen + (total - p.step) * step_samples
    schedule.set_horizon(total_samples)
    return total


def _log_layout_change(cfg: TrainConfig, info: DistInfo, saved: tuple, schedule: optim.Schedule,
                       steps_left: int) -> None:
    world, global_batch, old_cfg = saved
    changes = [f"{what} {old} -> {new}" for what, old, new in (
        ("world size", world, info.world_size),
        ("--batch-size", old_cfg.get("batch_size"), cfg.batch_size),
        ("--accum-freq", old_cfg.get("accum_freq"), cfg.accum_freq),
        ("--workers", old_cfg.get("workers"), cfg.workers)) if old not in (None, 0) and old != new]
    if changes:
        log.info("resume: %s (global batch %s -> %d); the LR schedule continues in samples (reference "
                 "batch %d, %.6g reference steps in all), the data position maps onto the new layout; "
                 "%d steps left", ", ".join(changes), global_batch or "?",
                 cfg.batch_size * cfg.accum_freq * info.world_size, schedule.ref_batch,
                 schedule.total_ref_steps, steps_left)


def _count_flops(bundle: ModelBundle) -> float:
    return flops_per_sample(bundle.model, bundle.model.visual.image_size, bundle.model.context_length)


def _setup_reporting(s: Session) -> None:
    s.peak_flops = peak_flops(s.info.device, s.cfg.peak_flops)
    if s.info.is_main:
        log.info("model %s: %.1fM parameters, %.3g GFLOP per sample (train); %d steps of %d samples "
                 "(%d steps per epoch); peak %s", s.bundle.model_name,
                 sum(p.numel() for p in s.bundle.model.parameters()) / 1e6, s.flops_per_sample / 1e9,
                 s.total_steps, s.cfg.batch_size * s.cfg.accum_freq * s.info.world_size,
                 s.steps_per_epoch, f"{s.peak_flops:.3g} FLOP/s" if s.peak_flops else "FLOP/s unknown "
                 "(no MFU; give --peak-flops)")
        s.reporters = Reporters(s.cfg)


def train(s: Session) -> None:
    """Optimizer steps until --steps/--epochs are done, epoch by epoch."""
    p, cfg = s.progress, s.cfg
    if s.watchdog is None:
        s.watchdog = Watchdog(s.info)
    watchdog = s.watchdog
    step_fn = TrainStep(s.model, s.loss_fn, s.optimizer, s.scaler, precision=cfg.precision,
                        grad_clip_norm=cfg.grad_clip_norm, info=s.info, mark=watchdog.enter, teacher=s.teacher)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, p.nonfinite_total)
    loader_epoch = p.epoch
    s.model.train()
    while p.step < s.total_steps:
        if p.epoch != loader_epoch:
            s.data.set_epoch(p.epoch)
            loader_epoch = p.epoch
        epoch_end = min(s.total_steps, p.step + s.steps_left_in_epoch())
        steps_before = p.step
        start = time.perf_counter()
        watchdog.enter("data")
        for batches, waited in step_groups(s.data.loader, cfg.accum_freq):
            watchdog.enter("forward/backward")
            lr = s.scheduler(p.step)
            outcome = step_fn(batches, p.step)
            p.step += 1
            p.samples_seen += outcome.samples * s.info.world_size
            p.epoch_samples += outcome.samples * s.info.world_size
            guard.observe(outcome.finite, p.step - 1)
            p.nonfinite_total = guard.total
            seconds = time.perf_counter() - start
            _after_step(s, outcome, lr, waited, seconds)
            watchdog.step_done(p.step, seconds)
            watchdog.enter("data")
            start = time.perf_counter()
            if p.step >= epoch_end:
                break
        if p.step == steps_before:
            raise DataError(f"--train-data {cfg.train_data}: epoch {p.epoch} gave no batches")
        p.epoch += 1
        p.epoch_samples = 0


def _after_step(s: Session, out: StepOutcome, lr: float, waited: float, seconds: float) -> None:
    p, cfg = s.progress, s.cfg
    last = p.step == s.total_steps
    logging_step = p.step % cfg.log_every_n_steps == 0 or p.step == 1 or last
    _record_metrics(s, out, lr, waited, seconds, logging_step)
    if s.info.is_main and logging_step:
        _log_step(s, out, lr, waited, seconds)
    epoch_done = s.steps_left_in_epoch() == 0
    every_epochs = lambda n: bool(n) and epoch_done and (p.epoch + 1) % n == 0  # noqa: E731
    s.checkpoints.check()  # a background write that failed for good stops the run here
    if s.checkpoints.due(p.step, last) or every_epochs(cfg.save_frequency):  # before validation: a failing validation loses no checkpoint
        # at most one write in flight: rank 0 waits out the previous one while the others wait on
        # the store, not in the save's collective (a slow store must not time the collective out)
        main_only(s.watchdog, s.info, "checkpoint", f"before-{p.step}", s.checkpoints.wait)
        with s.watchdog.phase("checkpoint"):  # every rank hands over its data position and RNG
            _save(s, epoch_done=epoch_done)
        if last:  # rank 0 waits for the write; the others wait on the store, not in a collective
            main_only(s.watchdog, s.info, "checkpoint", str(p.step), s.checkpoints.wait)
    if s.val_data is not None and (last or (cfg.val_every_steps and p.step % cfg.val_every_steps == 0)
                                   or every_epochs(cfg.val_frequency)):
        with s.watchdog.phase("validation"):  # every rank validates its part (bounded by --val-num-samples)
            _validate(s)
    if s.zeroshot_sets and zeroshot.due(cfg, p.step, s.steps_per_epoch, last):
        with s.watchdog.phase("validation"):  # every rank encodes its share of the images
            _zero_shot(s)


def _zero_shot(s: Session) -> None:
    results = zeroshot.evaluate(s.bundle, s.zeroshot_sets, s.info.device, s.cfg.zeroshot_batch_size,
                                s.info.rank, s.info.world_size)
    if s.info.is_main:
        zeroshot.record(s.cfg.run_dir, s.progress.step, s.progress.epoch, results)
        s.metrics.validation({k: v for res in results.values() for k, v in res["metrics"].items()})


def _record_metrics(s: Session, out: StepOutcome, lr: float, waited: float, seconds: float,
                    logging_step: bool) -> None:
    """Loss and logit scale come to the host on logging steps only: reading them waits for the device."""
    m, world = s.metrics, s.info.world_size
    m.step.set(s.progress.step)
    m.samples.inc(out.samples * world)
    if not out.finite:
        m.nonfinite.inc()
    elif logging_step:
        m.loss.set(out.loss)
        s.last_loss = out.loss
    if logging_step:
        m.logit_scale.set(out.logit_scale)
    m.lr.set(lr)
    m.step_seconds.observe(seconds)
    m.data_wait.inc(waited)
    rate = out.samples * world / max(seconds, 1e-9)
    m.samples_per_second.set(rate)
    if s.peak_flops and s.flops_per_sample:
        m.mfu.set(s.flops_per_sample * rate / (s.peak_flops * world))
    m.gpu_memory(s.info.device)
    if s.reporters is not None and logging_step:
        s.reporters.scalars({"train/loss": out.loss, "train/lr": lr, "train/scale": out.logit_scale,
                             "train/samples_per_second": rate, "train/data_time": waited,
                             "train/batch_time": seconds}, s.progress.step)


def _log_step(s: Session, out: StepOutcome, lr: float, waited: float, seconds: float) -> None:
    p, cfg, world = s.progress, s.cfg, s.info.world_size
    per_epoch = s.steps_per_epoch * cfg.batch_size * cfg.accum_freq * world
    in_epoch = p.epoch_samples
    rate = out.samples * world / max(seconds, 1e-9)
    log.info("Train Epoch: %d [%d/%d (%.0f%%)] Step: %d/%d Data (t): %.3f Batch (t): %.3f, %.5g/s, "
             "%.5g/s/rank LR: %.6f Logit Scale: %.3f Loss: %.5g%s", p.epoch, in_epoch, per_epoch,
             100.0 * in_epoch / max(per_epoch, 1), p.step, s.total_steps, waited, seconds, rate,
             rate / world, lr, out.logit_scale, out.loss, "" if out.finite else " (non-finite, skipped)")


def _validate(s: Session) -> None:
    if s.val_data is None:  # --val-data auto found no val split
        return
    s.last_val = evaluate(s.model, s.val_data, s.info.device, s.cfg.precision, parts_per_rank=not s.cfg.fsdp)
    if not s.info.is_main:  # --fsdp: the other ranks only take part in the sharded forward
        return
    s.metrics.validation({k: v for k, v in s.last_val.items() if k != "num_samples"})
    log.info("Eval Step: %d %s", s.progress.step,
             " ".join(f"{k}: {v:.4f}" for k, v in s.last_val.items()))
    if s.reporters is not None:
        s.reporters.scalars({f"val/{k}": v for k, v in s.last_val.items()}, s.progress.step)


def _save(s: Session, epoch_done: bool) -> None:
    """All ranks take part (each rank's data position and RNG); rank 0 writes in the background."""
    s.checkpoints.save(s.progress.step, epoch_done)
    if s.reporters is not None:  # TensorBoard events follow the checkpoints into the run's store
        s.reporters.sync()


def finish(s: Session, started: float) -> None:
    s.checkpoints.wait()
    if not s.info.is_main:
        return
    cfg, p = s.cfg, s.progress
    last_pointer = s.checkpoints.last_pointer
    skipped = s.data.skipped_samples() if hasattr(s.data, "skipped_samples") else 0
    log.info("done: %d steps, %d samples, final loss %s, %d non-finite steps skipped, %d bad samples "
             "skipped (rank 0), checkpoint %s", p.step, p.samples_seen, s.last_loss, p.nonfinite_total,
             skipped, last_pointer["uri"] if last_pointer else None)
    runinfo.record_stage(
        cfg.run_dir, "train", config=to_dict(cfg), started=started,
        inputs={"train_data": cfg.train_data, "val_data": cfg.val_data, "pretrained": cfg.pretrained,
                "resumed_from": s.loaded_from},
        outputs={"checkpoint": last_pointer, "step": p.step, "epoch": p.epoch,
                 "samples_seen": p.samples_seen, "final_loss": s.last_loss, "val": s.last_val,
                 "nonfinite_steps": p.nonfinite_total, "skipped_samples_rank0": skipped,
                 "checkpoint_fallbacks": s.checkpoints.fallbacks,
                 "checkpoint_prune_failures": s.checkpoints.prune_failures,
                 "world_size": s.info.world_size, "parallel": "fsdp" if s.cfg.fsdp else "ddp",
                 "state_bytes_per_rank": fsdp.local_state_bytes(s.bundle.model, s.optimizer)},
        packages=("torch", "open_clip_torch", "webdataset"))
    s.metrics.stage.mark_success()
    s.metrics.stage.push(cfg.pushgateway)
    if s.reporters is not None:
        s.reporters.close()
