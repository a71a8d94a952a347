"""Parity with open_clip_train's `train_one_epoch` beyond the CLIP loss in fp32: SigLIP, CoCa,
distillation, LiT with unlocked groups from a pretrained file, a timm optimizer, and bf16 autocast.

Same initial weights, same batches, 20 steps: the per-step losses agree to rel 1e-4. The
open_clip_train side builds its loss with open_clip's `create_loss(args)` and its optimizer as its
main.py does; the clipforge side uses the trainer's own pieces.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from test_parity import BATCH, STEPS, _Batches, _RecordingLoss, assert_close, make_batches

from stages.common.models import register_builtin_configs

MICRO, COCA = "clipforge-micro", "coca_clipforge-micro"


def make(model: str, seed: int = 0, **kw):
    """Both sides start from this model. CoCa's caption decoder is initialised as clipforge's
    build_model does: open_clip leaves its text_projection uninitialised memory."""
    from stages.train.model import init_caption_decoder

    register_builtin_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(model, output_dict=True, **kw)
    init_caption_decoder(model)
    return model


def config(model: str, accum: int, **kw):
    from stages.train.config import TrainConfig

    return TrainConfig(train_data="unused", model=model, batch_size=BATCH, accum_freq=accum, lr=1e-3,
                       warmup=5, wd=0.2, lr_scheduler="cosine", **kw)


def clipforge_losses(model, batches, cfg, teacher=None) -> list[float]:
    from stages.common.distributed import DistInfo
    from stages.train.loop import TrainStep
    from stages.train.loss import create_loss
    from stages.train.optim import create_optimizer, create_scheduler

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    steps = len(batches) // cfg.accum_freq
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg, steps, steps)
    step_fn = TrainStep(model, create_loss(cfg, info), optimizer, None, precision=cfg.precision,
                        grad_clip_norm=None, info=info, teacher=teacher)
    losses = []
    for step in range(steps):
        scheduler(step)
        losses.append(step_fn(batches[step * cfg.accum_freq:(step + 1) * cfg.accum_freq], step).loss)
    return losses


def open_clip_train_optimizer(model, cfg):
    """open_clip_train/main.py's optimizer: timm's factory for timm/..., else AdamW with its groups."""
    from stages.train.optim import default_adam_params

    if cfg.opt.startswith("timm/"):
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(model, cfg.opt.split("timm/")[-1], lr=cfg.lr, weight_decay=cfg.wd, eps=cfg.eps)
    p = default_adam_params(cfg.model)  # open_clip_train's by-name rule (test_openclip_options checks it)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": cfg.wd}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(p["beta1"], p["beta2"]), eps=p["eps"])


def open_clip_train_losses(model, batches, cfg, teacher=None) -> list[float]:
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    args = SimpleNamespace(
        device="cpu", precision=cfg.precision, accum_freq=cfg.accum_freq, distill=teacher is not None,
        skip_scheduler=False, batch_size=BATCH, world_size=1, rank=0, local_rank=0, grad_clip_norm=None,
        horovod=False, log_every_n_steps=10_000, wandb=False, save_logs=False, model=cfg.model,
        siglip=cfg.siglip, local_loss=False, gather_with_grad=False, loss_dist_impl=None,
        coca_caption_loss_weight=cfg.coca_caption_loss_weight,
        coca_contrastive_loss_weight=cfg.coca_contrastive_loss_weight)
    optimizer = open_clip_train_optimizer(model, cfg)
    steps = len(batches) // cfg.accum_freq
    loss = _RecordingLoss(open_clip.create_loss(args))
    data = {"train": SimpleNamespace(dataloader=_Batches(batches), set_epoch=lambda epoch: None)}
    train_one_epoch(model, data, loss, 0, optimizer, None, cosine_lr(optimizer, cfg.lr, cfg.warmup, steps),
                    teacher, args)
    return loss.totals[cfg.accum_freq - 1::cfg.accum_freq]


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    return make_batches(str(tmp_path_factory.mktemp("shards")), 2 * STEPS)


def compare(initial, batches, cfg, teacher=None):
    use = batches[:STEPS * cfg.accum_freq]
    theirs = open_clip_train_losses(copy.deepcopy(initial), use, cfg, teacher)
    ours = clipforge_losses(copy.deepcopy(initial), use, cfg, teacher)
    assert_close(ours, theirs)


def test_siglip(batches):
    initial = make(MICRO, init_logit_scale=np.log(10), init_logit_bias=-10)
    compare(initial, batches, config(MICRO, 1, siglip=True))


@pytest.mark.slow  # CoCa's caption head spans the whole vocabulary: minutes on 2 cores
@pytest.mark.parametrize("accum", [1, 2])
def test_coca_with_its_loss_weights(batches, accum):
    compare(make(COCA), batches, config(COCA, accum, coca_caption_loss_weight=1.0,
                                        coca_contrastive_loss_weight=0.5))


def test_distillation(batches):
    teacher = make(MICRO, seed=5).eval()
    compare(make(MICRO), batches, config(MICRO, 1, distill_model=MICRO, distill_pretrained="/unused.pt"), teacher)


def test_timm_optimizer(batches):
    # open_clip_train hands timm eps=None unless --eps is given, which timm rejects: give it
    compare(make(MICRO), batches, config(MICRO, 1, opt="timm/lamb", eps=1e-6))


def test_amp_bf16_on_cpu(batches):
    compare(make(MICRO), batches, config(MICRO, 1, precision="amp_bf16"))


def test_lit_with_unlocked_groups_from_a_pretrained_file(batches, tmp_path):
    """clipforge's build_model (weights from a file, tower locked but the last group) vs open_clip_train's."""
    from stages.train.model import build_model

    torch.save({"state_dict": make(MICRO, seed=11).state_dict(), "epoch": 1}, tmp_path / "epoch_1.pt")
    cfg = config(MICRO, 1, pretrained=str(tmp_path / "epoch_1.pt"), lock_image=True, lock_image_unlocked_groups=1)
    ours_model = build_model(cfg, torch.device("cpu"), 0).model
    theirs_model = make(MICRO)
    theirs_model.load_state_dict(make(MICRO, seed=11).state_dict())
    theirs_model.lock_image_tower(unlocked_groups=1)
    trainable = {n for n, p in ours_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs_model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.") for n in trainable) and not all(
        p.requires_grad for n, p in ours_model.named_parameters() if n.startswith("visual."))
    use = batches[:STEPS]
    assert_close(clipforge_losses(ours_model, use, cfg), open_clip_train_losses(theirs_model, use, cfg))
