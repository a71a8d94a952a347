"""The train stage end to end: set up (model, data, optimizer, resume), the step loop, the finish."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from stages.common import runinfo
from stages.common.config import to_dict
from stages.common.errors import ConfigError, DataError
from stages.common.logs import setup_logging
from stages.train import checkpoint, openclip_checkpoint, optim
from stages.train.config import TrainConfig
from stages.train.distributed import DistInfo, init_distributed, shutdown, wrap_ddp
from stages.train.loop import NonFiniteGuard, StepOutcome, TrainStep, step_groups
from stages.train.loss import create_loss
from stages.train.metrics import TrainMetrics, flops_per_sample, peak_flops
from stages.train.model import ModelBundle, build_distill_model, build_model, maybe_compile, random_seed
from stages.train.reporting import Reporters
from stages.train.validate import evaluate

log = logging.getLogger("clipforge.train")


@dataclasses.dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0


@dataclasses.dataclass
class Session:
    cfg: TrainConfig
    info: DistInfo
    bundle: ModelBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    scheduler: Any
    loss_fn: Any
    data: Any
    val_data: Any
    steps_per_epoch: int
    total_steps: int
    progress: Progress
    metrics: TrainMetrics
    loaded_from: str | None = None
    flops_per_sample: float = 0.0
    peak_flops: float = 0.0
    reporters: Any = None
    last_val: dict = dataclasses.field(default_factory=dict)
    last_pointer: dict | None = None
    last_loss: float | None = None
    teacher: Any = None


def run(cfg: TrainConfig) -> int:
    started = time.time()
    info = init_distributed(cfg.device, backend=cfg.dist_backend, url=cfg.dist_url,
                            same_device=cfg.no_set_device_rank)
    logs_here = info.is_main or (cfg.log_local and info.local_rank == 0)
    setup_logging("train", cfg.run_id, info.rank, cfg.log_level if logs_here else "WARNING")
    metrics = TrainMetrics(cfg.run_id, info.rank)
    metrics.serve(cfg.metrics_port, cfg.metrics_addr, info.local_rank)
    try:
        session = setup(cfg, info, metrics)
        train(session)
        finish(session, started)
        return 0
    finally:
        metrics.stage.stop()
        shutdown()


def setup(cfg: TrainConfig, info: DistInfo, metrics: TrainMetrics) -> Session:
    from stages.train.sources import get_train_data, get_val_data

    resume_uri = checkpoint.find_resume(cfg.resume, cfg.checkpoint_dir)
    ckpt = openclip_checkpoint.load_for_resume(resume_uri) if resume_uri else None
    progress = _progress_from(ckpt)
    bundle = build_model(cfg, info.device, info.rank)
    data = get_train_data(cfg, bundle.preprocess_train, bundle.tokenizer, rank=info.rank,
                          world_size=info.world_size, epoch=progress.epoch,
                          resume_state=ckpt.get("data_state") if ckpt else None)
    steps_per_epoch = data.num_batches // cfg.accum_freq
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--train-data {cfg.train_data}: {data.num_batches} batches per rank per epoch, but one "
            f"optimizer step needs --accum-freq {cfg.accum_freq} of them; use more data or a smaller "
            "--batch-size/--accum-freq")
    total_steps = cfg.steps or steps_per_epoch * cfg.epochs
    openclip_checkpoint.place(ckpt, progress, steps_per_epoch)
    optimizer = optim.create_optimizer(bundle.model, cfg)
    scaler = torch.amp.GradScaler(device=info.device.type) if cfg.precision == "amp" else None
    if ckpt:
        checkpoint.restore(ckpt, model=bundle.model, optimizer=optimizer, scaler=scaler,
                           rng=info.is_main)
        if not info.is_main:  # only rank 0's RNG is saved; the others get a fresh, distinct stream
            random_seed(cfg.seed + progress.step, info.rank)
        log.info("resumed from %s at step %d (epoch %d)", resume_uri, progress.step, progress.epoch)
    if cfg.use_bn_sync and info.distributed:
        bundle.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bundle.model)
    model = maybe_compile(wrap_ddp(bundle.model, info, cfg.ddp_static_graph), cfg.torchcompile)
    val_data = None
    if cfg.has_val and info.is_main:
        val_data = get_val_data(cfg, bundle.preprocess_val, bundle.tokenizer, rank=0, world_size=1)
    session = Session(cfg=cfg, info=info, bundle=bundle, model=model, optimizer=optimizer, scaler=scaler,
                      scheduler=optim.create_scheduler(optimizer, cfg, total_steps, steps_per_epoch),
                      loss_fn=create_loss(cfg, info), data=data, val_data=val_data,
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps, progress=progress,
                      metrics=metrics, loaded_from=resume_uri,
                      teacher=build_distill_model(cfg, info.device))
    _setup_reporting(session)
    return session


def _progress_from(ckpt: dict | None) -> Progress:
    if not ckpt:
        return Progress()
    return Progress(step=int(ckpt["step"]), epoch=int(ckpt["epoch"]),
                    samples_seen=int(ckpt.get("samples_seen", 0)),
                    nonfinite_total=int(ckpt.get("nonfinite_steps", 0)))


def _setup_reporting(s: Session) -> None:
    s.peak_flops = peak_flops(s.info.device, s.cfg.peak_flops)
    if s.info.is_main:
        visual = s.bundle.model.visual
        s.flops_per_sample = flops_per_sample(s.bundle.model, visual.image_size,
                                              s.bundle.model.context_length)
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
    step_fn = TrainStep(s.model, s.loss_fn, s.optimizer, s.scaler, precision=cfg.precision,
                        grad_clip_norm=cfg.grad_clip_norm, info=s.info, teacher=s.teacher)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, p.nonfinite_total)
    loader_epoch = p.epoch
    s.model.train()
    while p.step < s.total_steps:
        if p.epoch != loader_epoch:
            s.data.set_epoch(p.epoch)
            loader_epoch = p.epoch
        epoch_end = min(s.total_steps, (p.epoch + 1) * s.steps_per_epoch)
        steps_before = p.step
        start = time.perf_counter()
        for batches, waited in step_groups(s.data.loader, cfg.accum_freq):
            lr = s.scheduler(p.step)
            outcome = step_fn(batches, p.step)
            p.step += 1
            p.samples_seen += outcome.samples * s.info.world_size
            guard.observe(outcome.finite, p.step - 1)
            p.nonfinite_total = guard.total
            _after_step(s, outcome, lr, waited, time.perf_counter() - start)
            start = time.perf_counter()
            if p.step >= epoch_end:
                break
        if p.step == steps_before:
            raise DataError(f"--train-data {cfg.train_data}: epoch {p.epoch} gave no batches")
        p.epoch += 1


def _after_step(s: Session, out: StepOutcome, lr: float, waited: float, seconds: float) -> None:
    p, cfg = s.progress, s.cfg
    _record_metrics(s, out, lr, waited, seconds)
    last = p.step == s.total_steps
    if s.info.is_main and (p.step % cfg.log_every_n_steps == 0 or p.step == 1 or last):
        _log_step(s, out, lr, waited, seconds)
    epoch_done = p.step >= (p.epoch + 1) * s.steps_per_epoch
    every_epochs = lambda n: bool(n) and epoch_done and (p.epoch + 1) % n == 0  # noqa: E731
    if s.val_data is not None and (last or (cfg.val_every_steps and p.step % cfg.val_every_steps == 0)
                                   or every_epochs(cfg.val_frequency)):
        _validate(s)
    if last or (cfg.save_every_steps and p.step % cfg.save_every_steps == 0) or every_epochs(cfg.save_frequency):
        _save(s, epoch_done=epoch_done)


def _record_metrics(s: Session, out: StepOutcome, lr: float, waited: float, seconds: float) -> None:
    m, world = s.metrics, s.info.world_size
    m.step.set(s.progress.step)
    m.samples.inc(out.samples * world)
    if out.finite:
        m.loss.set(out.loss)
        s.last_loss = out.loss
    else:
        m.nonfinite.inc()
    m.lr.set(lr)
    m.logit_scale.set(out.logit_scale)
    m.step_seconds.observe(seconds)
    m.data_wait.inc(waited)
    rate = out.samples * world / max(seconds, 1e-9)
    m.samples_per_second.set(rate)
    if s.peak_flops and s.flops_per_sample:
        m.mfu.set(s.flops_per_sample * rate / (s.peak_flops * world))
    m.gpu_memory(s.info.device)
    if s.reporters is not None and (s.progress.step % s.cfg.log_every_n_steps == 0 or s.progress.step == 1
                                    or s.progress.step == s.total_steps):
        s.reporters.scalars({"train/loss": out.loss, "train/lr": lr, "train/scale": out.logit_scale,
                             "train/samples_per_second": rate, "train/data_time": waited,
                             "train/batch_time": seconds}, s.progress.step)


def _log_step(s: Session, out: StepOutcome, lr: float, waited: float, seconds: float) -> None:
    p, cfg, world = s.progress, s.cfg, s.info.world_size
    per_epoch = s.steps_per_epoch * cfg.batch_size * cfg.accum_freq * world
    in_epoch = (p.step - p.epoch * s.steps_per_epoch) * cfg.batch_size * cfg.accum_freq * world
    rate = out.samples * world / max(seconds, 1e-9)
    log.info("Train Epoch: %d [%d/%d (%.0f%%)] Step: %d/%d Data (t): %.3f Batch (t): %.3f, %.5g/s, "
             "%.5g/s/rank LR: %.6f Logit Scale: %.3f Loss: %.5g%s", p.epoch, in_epoch, per_epoch,
             100.0 * in_epoch / max(per_epoch, 1), p.step, s.total_steps, waited, seconds, rate,
             rate / world, lr, out.logit_scale, out.loss, "" if out.finite else " (non-finite, skipped)")


def _validate(s: Session) -> None:
    s.last_val = evaluate(s.model, s.val_data, s.info.device, s.cfg.precision)
    s.metrics.validation({k: v for k, v in s.last_val.items() if k != "num_samples"})
    log.info("Eval Step: %d %s", s.progress.step,
             " ".join(f"{k}: {v:.4f}" for k, v in s.last_val.items()))
    if s.reporters is not None:
        s.reporters.scalars({f"val/{k}": v for k, v in s.last_val.items()}, s.progress.step)


def _save(s: Session, epoch_done: bool) -> None:
    """Rank 0 writes; a checkpoint at an epoch's end resumes at the start of the next epoch."""
    if not s.info.is_main:
        return
    p = s.progress
    trainer_state = {
        "epoch": p.epoch + 1 if epoch_done else p.epoch, "samples_seen": p.samples_seen,
        "data_state": None if epoch_done else s.data.state(), "nonfinite_steps": p.nonfinite_total,
        "scheduler": optim.scheduler_state(s.cfg, s.total_steps, s.steps_per_epoch, p.step),
        "config": to_dict(s.cfg), "model_name": s.bundle.model_name, "model_cfg": s.bundle.model_cfg,
        "preprocess_cfg": s.bundle.preprocess_cfg}
    s.last_pointer, seconds = checkpoint.save(
        s.cfg.checkpoint_dir, step=p.step, model=s.model, optimizer=s.optimizer, scaler=s.scaler,
        trainer_state=trainer_state, keep_last=s.cfg.keep_last)
    s.metrics.ckpt_seconds.set(seconds)
    if s.reporters is not None:
        s.reporters.sync()
    s.metrics.ckpt_step.set(p.step)
    s.metrics.ckpt_time.set_to_current_time()


def finish(s: Session, started: float) -> None:
    if not s.info.is_main:
        return
    cfg, p = s.cfg, s.progress
    skipped = s.data.skipped_samples() if hasattr(s.data, "skipped_samples") else 0
    log.info("done: %d steps, %d samples, final loss %s, %d non-finite steps skipped, %d bad samples "
             "skipped (rank 0), checkpoint %s", p.step, p.samples_seen, s.last_loss, p.nonfinite_total,
             skipped, s.last_pointer["uri"] if s.last_pointer else None)
    runinfo.record_stage(
        cfg.run_dir, "train", config=to_dict(cfg), started=started,
        inputs={"train_data": cfg.train_data, "val_data": cfg.val_data, "pretrained": cfg.pretrained,
                "resumed_from": s.loaded_from},
        outputs={"checkpoint": s.last_pointer, "step": p.step, "epoch": p.epoch,
                 "samples_seen": p.samples_seen, "final_loss": s.last_loss, "val": s.last_val,
                 "nonfinite_steps": p.nonfinite_total, "skipped_samples_rank0": skipped,
                 "world_size": s.info.world_size},
        packages=("torch", "open_clip_torch", "webdataset"))
    s.metrics.stage.mark_success()
    s.metrics.stage.push(cfg.pushgateway)
    if s.reporters is not None:
        s.reporters.close()
