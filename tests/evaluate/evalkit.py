"""Eval test helpers: micro CLIP models (trained a few steps on coloured squares) and wds eval sets."""

from __future__ import annotations

import io
import random

from stages.common import storage

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "white": (245, 245, 245), "black": (10, 10, 10)}
CLASSNAMES = list(COLOURS)
TEMPLATES = ["a photo of a {c} square.", "a {c} thing.", "{c}"]


def square(colour: str, seed: int, size: int = 32):
    """A noisy square of a colour: easy for a tiny model, not identical images."""
    from PIL import Image

    rng = random.Random(seed)
    base = COLOURS[colour]
    img = Image.new("RGB", (size, size))
    img.putdata([tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in base)
                 for _ in range(size * size)])
    return img


def encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def tar_bytes(samples: list[dict]) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as writer:
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


def write_classification_set(uri: str, per_class: int = 4, shards: int = 2,
                             classnames: list[str] | None = None, templates: list[str] | None = None,
                             label_offset: int = 0) -> list[tuple]:
    """A CLIP_benchmark wds classification set; returns [(encoded image, label)] in order."""
    classnames = classnames if classnames is not None else CLASSNAMES
    templates = templates if templates is not None else TEMPLATES
    storage.write_text(storage.join(uri, "classnames.txt"), "\n".join(classnames) + "\n")
    storage.write_text(storage.join(uri, "zeroshot_classification_templates.txt"), "\n".join(templates) + "\n")
    items = [(square(name, 1000 + i * 17 + label), label)
             for label, name in enumerate(CLASSNAMES) for i in range(per_class)]
    fmts = ("webp", "png", "jpg")
    encoded = [(encode(img, fmts[i % 3]), label) for i, (img, label) in enumerate(items)]
    samples = [{"__key__": f"s{i:05d}", fmts[i % 3]: data, "cls": label + label_offset}
               for i, (data, label) in enumerate(encoded)]
    _write_shards(uri, samples, shards)
    return encoded


def write_retrieval_set(uri: str, per_class: int = 3, shards: int = 2) -> list[tuple]:
    """A retrieval set: each image with one caption; returns [(encoded image, caption)]."""
    storage.write_text(storage.join(uri, "dataset_type.txt"), "retrieval\n")
    items = [(square(name, 5000 + i * 13 + k), f"a {name} square number {i}")
             for k, name in enumerate(CLASSNAMES) for i in range(per_class)]
    encoded = [(encode(img, "png"), caption) for img, caption in items]
    samples = [{"__key__": f"r{i:05d}", "png": data, "txt": caption}
               for i, (data, caption) in enumerate(encoded)]
    _write_shards(uri, samples, shards)
    return encoded


def _write_shards(uri: str, samples: list[dict], shards: int) -> None:
    per = -(-len(samples) // shards)
    for s in range(shards):
        storage.write_bytes(storage.join(uri, "test", f"{s}.tar"), tar_bytes(samples[s * per:(s + 1) * per]))
    storage.write_text(storage.join(uri, "test", "nshards.txt"), f"{shards}\n")


def train_micro(steps: int = 60, seed: int = 0):
    """clipforge-micro trained with open_clip's ClipLoss on captioned squares, in seconds on a CPU."""
    import open_clip
    import torch

    from stages.common.models import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(seed)
    model, preprocess, _ = open_clip.create_model_and_transforms("clipforge-micro")
    tokenizer = open_clip.get_tokenizer("clipforge-micro")
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(steps):
        names = rng.sample(CLASSNAMES, len(CLASSNAMES))
        images = torch.stack([preprocess(square(n, rng.randrange(10**6))) for n in names])
        texts = tokenizer([rng.choice(TEMPLATES).replace("{c}", n) for n in names])
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_checkpoint(model, run_dir: str, step: int = 60) -> dict:
    import open_clip

    from stages.common import checkpoints

    cfg = open_clip.get_model_config("clipforge-micro")
    pre = dict(model.visual.preprocess_cfg)
    return checkpoints.save(storage.join(run_dir, "checkpoints"), step, {
        "model": model.state_dict(), "model_name": "clipforge-micro", "model_cfg": cfg,
        "preprocess_cfg": pre, "epoch": 0, "samples_seen": step * 6,
        "config": {"model": "clipforge-micro", "lr": 3e-3, "batch_size": 6}})


def untrained_micro(seed: int = 1):
    """A randomly initialised micro model: metrics well away from 0 and 1, so parity tests bite."""
    import open_clip
    import torch

    from stages.common.models import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(seed)
    return open_clip.create_model("clipforge-micro").eval()
