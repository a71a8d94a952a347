"""open_clip_train's model, optimizer and data options, checked on the pieces that implement them."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from stages.common import storage
from stages.train.config import TrainConfig


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"train_data": "unused", "model": "clipforge-micro", **kw})


def build(**kw):
    from stages.common.models import register_builtin_configs
    from stages.train.model import build_model

    register_builtin_configs()
    return build_model(cfg(**kw), torch.device("cpu"), 0)


@pytest.mark.parametrize("model, betas, eps", [("ViT-B-32", (0.9, 0.98), 1e-6), ("RN50", (0.9, 0.999), 1e-8),
                                                ("convnext_base", (0.9, 0.999), 1e-8),
                                                ("clipforge-micro", (0.9, 0.98), 1e-6)])
def test_adamw_defaults_by_model_family_as_open_clip_train(model, betas, eps):
    from open_clip_train.params import get_default_params

    from stages.train.optim import create_optimizer

    opt = create_optimizer(torch.nn.Linear(2, 2), cfg(model=model))
    assert opt.defaults["betas"] == betas and opt.defaults["eps"] == eps
    if not model.startswith("clipforge-"):  # clipforge's shipped ViTs lack "vit" in their names
        theirs = get_default_params(model)
        assert (theirs["beta1"], theirs["beta2"], theirs["eps"]) == (*betas, eps)
    given = create_optimizer(torch.nn.Linear(2, 2), cfg(model=model, beta2=0.95, eps=1e-7))
    assert given.defaults["betas"] == (0.9, 0.95) and given.defaults["eps"] == 1e-7


def test_timm_optimizer_takes_momentum_and_skip_scheduler_keeps_the_lr():
    from stages.train.optim import create_optimizer, create_scheduler

    c = cfg(opt="timm/sgd", momentum=0.5, lr=0.1, wd=0.0)
    opt = create_optimizer(torch.nn.Linear(2, 2), c)
    assert type(opt).__name__ == "SGD" and opt.param_groups[0]["momentum"] == 0.5
    c.skip_scheduler = True
    schedule = create_scheduler(opt, c, total_steps=100, steps_per_epoch=10)
    assert [schedule(s) for s in (0, 50, 99)] == [0.1] * 3 and opt.param_groups[0]["lr"] == 0.1


def test_model_and_preprocess_overrides_reach_open_clip():
    bundle = build(force_image_size=[48], image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25],
                   image_interpolation="bilinear", image_resize_mode="squash", force_quick_gelu=True,
                   force_context_length=12, aug_cfg=["scale=(0.9, 1.0)"])
    assert bundle.model.visual.image_size == (48, 48)
    assert tuple(bundle.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5) and bundle.preprocess_cfg["resize_mode"] == "squash"
    crop = bundle.preprocess_train.transforms[0]
    assert crop.size == (48, 48) and crop.scale == (0.9, 1.0)
    assert bundle.tokenizer(["a photo"]).shape == (1, 12)
    assert bundle.model_cfg["quick_gelu"] and bundle.model_cfg["vision_cfg"]["image_size"] == 48
    image = bundle.preprocess_val(Image.new("RGB", (80, 40), (255, 255, 255)))
    assert image.shape == (3, 48, 48) and torch.allclose(image, torch.full_like(image, 2.0))  # (1-0.5)/0.25


def test_lit_unlocked_groups_and_text_layers():
    bundle = build(lock_image=True, lock_image_unlocked_groups=1, lock_text=True, lock_text_unlocked_layers=1)
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and "visual.conv1.weight" not in trainable
    assert "text_projection" in trainable  # open_clip's last text group
    assert not any(n.startswith("transformer.resblocks.") for n in trainable)
    assert "token_embedding.weight" not in trainable


def write_table(root: str, rows: int) -> str:
    lines = ["filepath\ttitle"]
    for i in range(rows):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (10 * i, 0, 0)).save(buf, format="PNG")
        storage.write_bytes(storage.join(root, "img", f"{i}.png"), buf.getvalue())
        lines.append(f"img/{i}.png\tsquare number {i}")
    storage.write_bytes(storage.join(root, "train.csv"), ("\n".join(lines) + "\n").encode())
    return storage.join(root, "train.csv")


def test_csv_table_and_images_in_s3_resume_mid_epoch(s3):
    """Relative image paths resolve beside the table in the bucket; a loader state resumes in the epoch."""
    import open_clip

    from stages.common.models import register_builtin_configs
    from stages.train.sources import get_train_data

    register_builtin_configs()
    table = write_table(f"{s3}/tables", 12)
    _, preprocess, _ = open_clip.create_model_and_transforms("clipforge-micro")
    tokenizer = open_clip.get_tokenizer("clipforge-micro")
    c = cfg(train_data=table, batch_size=4, workers=0, dataset_type="auto")
    data = get_train_data(c, preprocess, tokenizer, rank=0, world_size=1)
    assert data.num_batches == 3 and data.num_samples == 12
    batches = list(data.loader)
    assert [b[0].shape for b in batches] == [(4, 3, 32, 32)] * 3
    again = get_train_data(c, preprocess, tokenizer, rank=0, world_size=1,
                           resume_state={"epoch": 0, "batches": 2, "global_batch_size": 4})
    rest = list(again.loader)
    assert len(rest) == 1 and torch.equal(rest[0][1], batches[2][1])  # the same captions, in the same order
    assert again.state()["batches"] == 3


def test_csv_image_that_cannot_be_read_is_named(tmp_path):
    import open_clip

    from stages.common.errors import DataError
    from stages.common.models import register_builtin_configs
    from stages.train.csvdata import CsvDataset

    register_builtin_configs()
    (tmp_path / "t.csv").write_text("filepath\ttitle\nmissing.png\ta caption\n")
    _, _, preprocess = open_clip.create_model_and_transforms("clipforge-micro")
    ds = CsvDataset(str(tmp_path / "t.csv"), preprocess, open_clip.get_tokenizer("clipforge-micro"), cfg())
    with pytest.raises(DataError, match="missing.png .row 0.: cannot read the image"):
        ds[0]


WEIGHT_DTYPES = {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "amp_bfloat16": torch.float32,
                 "fp16": torch.float16, "pure_fp16": torch.float16, "amp": torch.float32}


@pytest.mark.parametrize("precision", sorted(WEIGHT_DTYPES))
def test_reduced_precisions_train_on_cpu(precision):
    """open_clip_train's bf16/fp16 modes on this torch's CPU kernels: weights cast (bf16, pure_*, fp16)
    or autocast (amp_bfloat16; amp with its GradScaler), finite losses, and the weights move."""
    from stages.common.distributed import DistInfo
    from stages.train.loop import TrainStep
    from stages.train.loss import create_loss
    from stages.train.optim import create_optimizer

    c = cfg(precision=precision, batch_size=4, lr=1e-3)
    bundle = build(precision=precision, batch_size=4)
    assert bundle.model.visual.conv1.weight.dtype == WEIGHT_DTYPES[precision]
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu") if precision == "amp" else None
    step = TrainStep(bundle.model, create_loss(c, info), create_optimizer(bundle.model, c), scaler,
                     precision=precision, grad_clip_norm=1.0, info=info)
    before = bundle.model.visual.conv1.weight.detach().clone()
    batch = (torch.randn(4, 3, 32, 32), bundle.tokenizer(["a", "b", "c", "d"]))
    outcomes = [step([batch], s) for s in range(3)]
    assert all(o.finite for o in outcomes)
    assert not torch.equal(bundle.model.visual.conv1.weight, before)


def test_bnb_linear_on_the_cpu_is_refused_before_the_model_is_built():
    """bitsandbytes' SwitchBack layers are triton kernels for CUDA GPUs; a CPU run names that."""
    from stages.common.errors import ConfigError

    with pytest.raises(ConfigError, match="--use-bnb-linear SwitchBackLinear: .* CUDA GPUs only, and this run is on cpu"):
        build(use_bnb_linear="SwitchBackLinear")


def test_bn_sync_on_the_cpu_is_refused_for_batchnorm_models_and_a_no_op_for_vits():
    """torch's SyncBatchNorm fails in the first forward on the CPU; the stage says so before it."""
    import open_clip

    from stages.common.errors import ConfigError
    from stages.train.model import sync_batchnorm

    resnet = open_clip.CLIP(embed_dim=16, vision_cfg=open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8,
                                                                             image_size=32),
                            text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2,
                                                           layers=1))
    with pytest.raises(ConfigError, match="--use-bn-sync.*GPUs only"):
        sync_batchnorm(resnet, torch.device("cpu"))
    vit = build().model
    assert sync_batchnorm(vit, torch.device("cpu")) is vit
    if torch.cuda.is_available():  # where it can run, BatchNorm becomes SyncBatchNorm
        synced = sync_batchnorm(resnet, torch.device("cuda"))
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())


def test_coca_starts_from_the_same_finite_weights_whatever_memory_held():
    """open_clip leaves CoCa's caption-head projection as torch.empty memory; build_model initialises it."""
    first = build(model="coca_clipforge-micro").model.state_dict()
    junk = [torch.full((1 << 20,), 3e30) for _ in range(64)]  # freed memory full of huge values
    del junk
    second = build(model="coca_clipforge-micro").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    projection = second["text_decoder.text_projection"]
    width = projection.shape[0]
    assert torch.isfinite(projection).all() and abs(projection.std().item() - width ** -0.5) < 0.2 * width ** -0.5
