"""The train step (open_clip_train's accumulation semantics) and the loop over steps and epochs.

The step follows open_clip_train's `train_one_epoch`: with `--accum-freq K` the features of K
micro-batches are first computed without gradients, then each micro-batch is run again with
gradients and its loss is taken against the cached features of the others as negatives.

A non-finite loss on any rank skips the optimizer update on every rank (the ranks agree through
one all-reduce, the step's only wait for the device) and is counted; `--max-nonfinite-steps` of them in a row stop the run.
`CLIPFORGE_DEBUG_NAN_AT_STEP` ("5", "3,7", "4-9" or "6-") turns the loss of those optimizer
steps (0-based step index) into NaN, to exercise the guard.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from open_clip import get_input_dtype

from stages.common.distributed import DistInfo, all_true
from stages.common.errors import ClipforgeError
from stages.train.model import clamp_logit_scale, unwrap

log = logging.getLogger(__name__)


class NonFiniteLossError(ClipforgeError):
    """The loss stayed NaN/Inf for --max-nonfinite-steps steps in a row."""

    exit_code = 5


def get_autocast(precision: str, device: torch.device):
    dtypes = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}
    if precision not in dtypes:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtypes[precision])


def parse_step_set(spec: str) -> Callable[[int], bool]:
    """'5', '3,7', '4-9', '6-' -> a predicate on the step index."""
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        ranges.append((int(lo), int(hi) if hi else (None if sep else int(lo))))
    return lambda s: any(s >= lo and (hi is None or s <= hi) for lo, hi in ranges)


@dataclasses.dataclass
class StepOutcome:
    """One step's result; the loss and logit scale stay on the device until a logging step reads them."""

    loss_t: torch.Tensor
    finite: bool
    logit_scale_t: torch.Tensor
    samples: int

    @functools.cached_property
    def _host(self) -> tuple[float, float]:
        loss, scale = torch.stack([self.loss_t.float(), self.logit_scale_t.float()]).tolist()
        return loss, scale

    @property
    def loss(self) -> float:
        return self._host[0]

    @property
    def logit_scale(self) -> float:
        return self._host[1]


class TrainStep:
    """One optimizer step over `accum_freq` micro-batches."""

    def __init__(self, model, loss_fn, optimizer, scaler, *, precision: str, grad_clip_norm: float | None,
                 info: DistInfo, mark: Callable[[str], None] = lambda phase: None, teacher=None):
        self.model, self.loss_fn, self.optimizer, self.scaler = model, loss_fn, optimizer, scaler
        self.mark = mark  # tells the watchdog which phase the step is in
        self.teacher = teacher  # --distill-model: its outputs go to the loss as dist_*
        self.info = info
        self.autocast = get_autocast(precision, info.device)
        self.input_dtype = get_input_dtype(precision)
        self.grad_clip_norm = grad_clip_norm
        self.inject_nan = parse_step_set(os.environ.get("CLIPFORGE_DEBUG_NAN_AT_STEP", ""))

    def __call__(self, batches: list, step: int) -> StepOutcome:
        batches = [self._to_device(b) for b in batches]
        self.optimizer.zero_grad()
        poison = float("nan") if self.inject_nan(step) else 0.0
        if len(batches) == 1:
            losses = [self._plain(*batches[0], poison)]
        else:
            losses = self._accumulated(batches, poison)
        self.mark("collective")
        finite = all_true(torch.stack([torch.isfinite(loss) for loss in losses]).all(), self.info)
        self.mark("optimizer")
        if finite:
            self._update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.model)
        logit_scale = unwrap(self.model).logit_scale.detach().exp()
        return StepOutcome(loss_t=losses[-1], finite=finite, logit_scale_t=logit_scale,
                           samples=sum(b[0].shape[0] for b in batches))

    def _to_device(self, batch):
        images, texts = batch
        return (images.to(device=self.info.device, dtype=self.input_dtype, non_blocking=True),
                texts.to(device=self.info.device, non_blocking=True))

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _plain(self, images, texts, poison: float) -> torch.Tensor:
        with self.autocast():
            out = self.model(images, texts)
            if self.teacher is not None:
                with torch.no_grad():
                    out.update({f"dist_{k}": v for k, v in self.teacher(images, texts).items()})
            total = sum(self.loss_fn(**out, output_dict=True).values()) + poison
        self._backward(total)
        return total.detach()

    def _accumulated(self, batches: list, poison: float) -> list[torch.Tensor]:
        cached: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad(), self.autocast():
            for images, texts in batches:
                out = self.model(images, texts)
                for key in ("logit_scale", "logit_bias"):
                    out.pop(key, None)
                for key, val in out.items():
                    cached.setdefault(key, []).append(val)
        losses = []
        for j, (images, texts) in enumerate(batches):
            with self.autocast():
                out = self.model(images, texts)
                extra = {k: out.pop(k) for k in ("logit_scale", "logit_bias") if k in out}
                inputs = {k: torch.cat(v[:j] + [out[k]] + v[j + 1:]) for k, v in cached.items()}
                total = sum(self.loss_fn(**inputs, **extra, output_dict=True).values()) + poison
            self._backward(total)
            losses.append(total.detach())
        return losses

    def _update(self) -> None:
        params = self.model.parameters()
        if self.scaler is not None:
            if self.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm, norm_type=2.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm, norm_type=2.0)
        self.optimizer.step()


class NonFiniteGuard:
    """Counts skipped steps; raises after `limit` in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def observe(self, finite: bool, step: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        log.warning("step %d: non-finite loss, update skipped (%d in a row, %d in all)",
                    step, self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"the loss was NaN/Inf for {self.in_a_row} steps in a row (up to step {step}; "
                f"--max-nonfinite-steps {self.limit}); stopping. Lower --lr, add --grad-clip-norm, "
                "or use fp32/amp_bf16; the last good checkpoint is the one LATEST names")


def step_groups(loader, accum_freq: int) -> Iterator[tuple[list, float]]:
    """Groups of `accum_freq` batches, with the seconds spent waiting for them."""
    group, waited, start = [], 0.0, time.perf_counter()
    for batch in loader:
        waited += time.perf_counter() - start
        group.append(batch)
        if len(group) == accum_freq:
            yield group, waited
            group, waited = [], 0.0
        start = time.perf_counter()
