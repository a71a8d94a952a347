"""Parity with open_clip_train: same initial weights, same batches, fp32 -> the same per-step losses.

The open_clip_train side is its own `train_one_epoch`, driven with its args namespace and a data
object yielding the prepared batches. The clipforge side is the trainer's public pieces
(`TrainStep`, `create_loss`, `create_optimizer`, `create_scheduler`). This file is also the
torchrun worker of the 2-process run (`python tests/train/test_parity.py ...`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

MODEL = "clipforge-micro"
BATCH = 8
STEPS = 20
REL = 1e-4


def trainer_cfg(accum: int, **kw):
    from stages.train.config import TrainConfig

    return TrainConfig(train_data="unused", model=MODEL, batch_size=BATCH, accum_freq=accum, lr=1e-3,
                       warmup=5, wd=0.2, lr_scheduler="cosine", precision="fp32", **kw)


def make_model(seed: int = 0):
    import open_clip

    from stages.common.models import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(MODEL, output_dict=True)


def make_batches(root: str, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import open_clip
    from shards import make_shards

    from stages.common.models import register_builtin_configs
    from stages.train import data

    register_builtin_configs()
    make_shards(root, n_samples=count * BATCH, samples_per_shard=40, image_size=64, seed=0)
    _, _, val_tf = open_clip.create_model_and_transforms(MODEL)
    cfg = SimpleNamespace(train_data=root, train_data_upsampling_factors=None, val_data="none",
                          dataset_resampled=False, train_num_samples=None, batch_size=BATCH, workers=0, seed=0)
    info = data.get_train_data(cfg, val_tf, open_clip.get_tokenizer(MODEL), rank=0, world_size=1)
    return [(i.clone(), t.clone()) for i, t in info.loader][:count]


def clipforge_losses(model, batches, accum: int, rank: int = 0, world: int = 1, **loss_kw) -> list[float]:
    from stages.common.distributed import DistInfo
    from stages.train.loop import TrainStep
    from stages.train.loss import create_loss
    from stages.train.optim import create_optimizer, create_scheduler

    cfg = trainer_cfg(accum, **loss_kw)
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    steps = len(batches) // accum
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg, steps, steps)
    train_step = TrainStep(model, create_loss(cfg, info), optimizer, None, precision="fp32",
                           grad_clip_norm=None, info=info)
    losses = []
    for step in range(steps):
        scheduler(step)
        losses.append(train_step(batches[step * accum:(step + 1) * accum], step).loss)
    return losses


class _Batches(list):
    """open_clip_train's dataloader: iterable with num_batches and num_samples."""

    @property
    def num_batches(self) -> int:
        return len(self)

    @property
    def num_samples(self) -> int:
        return len(self) * BATCH


class _RecordingLoss:
    """open_clip's ClipLoss, remembering the total loss of every call."""

    def __init__(self, loss):
        self.loss, self.totals = loss, []

    def __call__(self, *args, **kw):
        out = self.loss(*args, **kw)
        self.totals.append(float(sum(out.values()).detach()))
        return out


def open_clip_train_losses(model, batches, accum: int) -> list[float]:
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    cfg = trainer_cfg(accum)
    # open_clip_train/main.py's parameter groups, written out as it does
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": cfg.wd}]
    from stages.train.optim import default_adam_params

    adam = default_adam_params(cfg.model)  # what --beta1/--beta2/--eps default to for this model
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(adam["beta1"], adam["beta2"]), eps=adam["eps"])
    steps = len(batches) // accum
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup, steps)
    loss = _RecordingLoss(ClipLoss(cache_labels=True, rank=0, world_size=1))
    args = SimpleNamespace(device="cpu", precision="fp32", accum_freq=accum, distill=False,
                           skip_scheduler=False, batch_size=BATCH, world_size=1, rank=0, local_rank=0,
                           grad_clip_norm=None, horovod=False, log_every_n_steps=10_000, wandb=False,
                           save_logs=False)
    data = {"train": SimpleNamespace(dataloader=_Batches(batches), set_epoch=lambda epoch: None)}
    train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, args)
    return loss.totals[accum - 1::accum]  # with accumulation, the last micro-batch's loss of each step


def assert_close(ours: list[float], theirs: list[float]) -> None:
    assert len(ours) == len(theirs) >= STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(a - b) <= REL * abs(b), f"step {step}: clipforge {a} vs open_clip_train {b}"
    assert ours[-1] < ours[0]  # it trains, so the comparison is not between two constants


def test_losses_match_open_clip_train_with_and_without_accumulation(tmp_path):
    batches = make_batches(str(tmp_path / "shards"), 2 * STEPS)
    initial = make_model()
    for accum in (1, 2):
        use = batches[:STEPS * accum]
        theirs = open_clip_train_losses(copy.deepcopy(initial), use, accum)
        ours = clipforge_losses(copy.deepcopy(initial), use, accum)
        assert_close(ours, theirs)


def test_two_gloo_ranks_with_local_loss_match_one_process(tmp_path, cli_env):
    batches = make_batches(str(tmp_path / "shards"), STEPS)
    initial = make_model()
    torch.save({"batches": batches, "model": initial.state_dict()}, tmp_path / "inputs.pt")
    one = clipforge_losses(copy.deepcopy(initial), batches, 1)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", __file__, str(tmp_path)]
    subprocess.run(cmd, env=cli_env, check=True, timeout=600, cwd=Path(__file__).parent)
    two = json.loads((tmp_path / "losses.json").read_text())
    assert_close(two, one)


def _worker(out_dir: str) -> None:
    """torchrun worker: half of each global batch per rank, local loss + gather with grad, DDP."""
    import torch.distributed as dist

    from stages.common.distributed import DistInfo, wrap_ddp

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = torch.load(Path(out_dir) / "inputs.pt", weights_only=True)
    model = make_model()
    model.load_state_dict(inputs["model"])
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    model = wrap_ddp(model, info, static_graph=False)
    half = BATCH // world
    mine = [(i[rank * half:(rank + 1) * half], t[rank * half:(rank + 1) * half]) for i, t in inputs["batches"]]
    local = torch.tensor(clipforge_losses(model, mine, 1, rank, world, local_loss=True, gather_with_grad=True))
    dist.all_reduce(local)  # each rank's local loss covers its rows; the global loss is their mean
    if rank == 0:
        (Path(out_dir) / "losses.json").write_text(json.dumps((local / world).tolist()))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker(sys.argv[1])
