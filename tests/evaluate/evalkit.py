"""Eval test helpers: micro CLIP models (trained a few steps on coloured squares) and wds eval sets."""

from __future__ import annotations

import io
import random
from collections.abc import Callable

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


def _write_shards(uri: str, samples: list[dict], shards: int, split: str = "test") -> None:
    per = -(-len(samples) // shards)
    for s in range(shards):
        storage.write_bytes(storage.join(uri, split, f"{s}.tar"), tar_bytes(samples[s * per:(s + 1) * per]))
    storage.write_text(storage.join(uri, split, "nshards.txt"), f"{shards}\n")


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


def npy_bytes(values) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype="int64"), allow_pickle=False)
    return buf.getvalue()


def halves(left: str, right: str, seed: int, size: int = 32):
    """An image whose left half is one colour and right half another (two labels)."""

    img = square(left, seed, size)
    img.paste(square(right, seed + 1, size).crop((size // 2, 0, size, size)), (size // 2, 0))
    return img


def write_multilabel_set(uri: str, count: int = 18, shards: int = 2) -> list[tuple]:
    """CLIP_benchmark's multilabel wds layout: dataset_type.txt 'multilabel', multi-hot .npy targets."""
    storage.write_text(storage.join(uri, "dataset_type.txt"), "multilabel\n")
    storage.write_text(storage.join(uri, "classnames.txt"), "\n".join(CLASSNAMES) + "\n")
    storage.write_text(storage.join(uri, "zeroshot_classification_templates.txt"), "a photo of {c}.\n{c}\n")
    rng = random.Random(7)
    items = []
    for i in range(count):
        a, b = rng.sample(range(len(CLASSNAMES)), 2)
        target = [1 if c in (a, b) else 0 for c in range(len(CLASSNAMES))]
        items.append((encode(halves(CLASSNAMES[a], CLASSNAMES[b], 300 + i), "png"), target))
    _write_shards(uri, [{"__key__": f"m{i:05d}", "png": data, "npy": npy_bytes(t)}
                        for i, (data, t) in enumerate(items)], shards)
    return items


def write_multicaption_set(uri: str, per_class: int = 3, shards: int = 2) -> list[tuple]:
    """A retrieval set with two or three captions per image (one per line of .txt)."""
    storage.write_text(storage.join(uri, "dataset_type.txt"), "retrieval\n")
    items = []
    for k, name in enumerate(CLASSNAMES):
        for i in range(per_class):
            captions = [f"a {name} square number {i}", f"{name}"] + ([f"something {name}"] if i % 2 else [])
            items.append((encode(square(name, 7000 + i * 13 + k), "png"), captions))
    _write_shards(uri, [{"__key__": f"c{i:05d}", "png": data, "txt": "\n".join(caps)}
                        for i, (data, caps) in enumerate(items)], shards)
    return items


def write_grouped_set(uri: str, fields: int, per_class: int = 4, shards: int = 2, seed: int = 3) -> list[tuple]:
    """A classification set whose samples carry DataComp-style .npy metadata (`fields` small ints,
    the last-but-one varied most); returns [(encoded image, label, metadata)]."""
    storage.write_text(storage.join(uri, "classnames.txt"), "\n".join(CLASSNAMES) + "\n")
    storage.write_text(storage.join(uri, "zeroshot_classification_templates.txt"), "\n".join(TEMPLATES) + "\n")
    rng = random.Random(seed)
    items = []
    for label, name in enumerate(CLASSNAMES):
        for i in range(per_class):
            meta = [rng.randrange(3) for _ in range(fields - 1)] + [label]
            items.append((encode(square(name, 900 + i * 31 + label), "png"), label, meta))
    rng.shuffle(items)
    _write_shards(uri, [{"__key__": f"g{i:05d}", "png": data, "cls": label, "npy": npy_bytes(meta)}
                        for i, (data, label, meta) in enumerate(items)], shards)
    return items


def write_probe_set(uri: str, train_per_class: int = 5, test_per_class: int = 3) -> None:
    """A classification set with train/ and test/ splits (CLIP_benchmark's linear-probe layout)."""
    storage.write_text(storage.join(uri, "classnames.txt"), "\n".join(CLASSNAMES) + "\n")
    storage.write_text(storage.join(uri, "zeroshot_classification_templates.txt"), "{c}\n")
    for split, per, base in (("train", train_per_class, 20000), ("test", test_per_class, 40000)):
        samples = [{"__key__": f"{split}{label:02d}{i:03d}", "png": encode(square(name, base + i * 7 + label), "png"),
                    "cls": label} for label, name in enumerate(CLASSNAMES) for i in range(per)]
        _write_shards(uri, samples, 2, split)


WINOGAVIL_SIZES = (5, 6, 10, 12, 5, 10)


def write_winogavil_cache(cache_dir: str, sizes: tuple[int, ...] = WINOGAVIL_SIZES,
                          edit: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """nlphuji/winogavil's test split as DataComp's downloader leaves it in <root>/hf_cache: a
    Hugging Face datasets cache (arrow file + dataset_info.json) whose images are paths into the
    cache's downloads/extracted folder, as the dataset's loading script stored them. `edit` may
    change the rows (drop a column, break an example) before they are written. Returns the rows."""
    import os

    import datasets
    from datasets.arrow_writer import ArrowWriter

    rng = random.Random(7)
    images_dir = os.path.join(cache_dir, "downloads", "extracted", "0f1e2d", "winogavil_images")
    os.makedirs(images_dir, exist_ok=True)
    rows = []
    for i, size in enumerate(sizes):
        cue = CLASSNAMES[i % len(CLASSNAMES)]
        colours = [cue] * (2 + i % 3) + [rng.choice([c for c in CLASSNAMES if c != cue])
                                         for _ in range(size - 2 - i % 3)]
        rng.shuffle(colours)
        candidates = [f"{colour}_{i}_{k}" for k, colour in enumerate(colours)]
        paths = [os.path.join(images_dir, name + ".jpg") for name in candidates]
        for k, (colour, path) in enumerate(zip(colours, paths, strict=True)):
            square(colour, 9000 + 31 * i + k).save(path, format="JPEG")
        rows.append({"ID": i, "cue": cue, "candidates": candidates, "num_associations": colours.count(cue),
                     "associations": [n for n, c in zip(candidates, colours, strict=True) if c == cue],
                     "candidate_images": paths})
    if edit:
        edit(rows)
    features = datasets.Features({
        "ID": datasets.Value("int64"), "cue": datasets.Value("string"),
        "candidates": datasets.List(datasets.Value("string")), "num_associations": datasets.Value("int64"),
        "associations": datasets.List(datasets.Value("string")),
        "candidate_images": datasets.List(datasets.Image())})
    features = datasets.Features({k: v for k, v in features.items() if k in rows[0]})
    folder = os.path.join(cache_dir, "nlphuji___winogavil", "default", "0.0.0", "5a6b7c8d9e")
    os.makedirs(folder)
    with ArrowWriter(features=features, path=os.path.join(folder, "winogavil-test.arrow")) as writer:
        for row in rows:
            writer.write(features.encode_example(row))
        count, size_bytes = writer.finalize()
    split = datasets.SplitInfo("test", num_bytes=size_bytes, num_examples=count, dataset_name="winogavil")
    datasets.DatasetInfo(features=features, config_name="default", dataset_name="winogavil",
                         splits=datasets.SplitDict({"test": split})).write_to_directory(folder)
    return rows


# FairFace/UTKFace objectives as DataComp's sets hold them ("objective:text" lines), their classes
# named by colour so that a micro model trained on coloured squares predicts them apart. Race index
# 1 is white (DataComp's white vs non-white split); toxic indices 14-17 are non-human, 18+ crime.
FACE_CLASSES = {
    "race": {"fairface": ["black", "white", "red", "green", "blue", "yellow", "purple"],
             "utkface": ["black", "white", "red", "green", "blue"]},
    "gender": ["red", "blue"],
    "age": ["black", "white", "red", "green", "blue", "yellow", "grey", "pink", "brown"],
    "toxic": ["white", "black"] + [f"word{i}" for i in range(12)] + ["green", "animal", "gorilla", "yellow"]
             + ["red", "blue", "thief"],
}
FACE_TEMPLATES = ["race:a photo of a {c} square.", "race:a {c} thing.", "gender:a photo of a {c} square.",
                  "age:a {c} thing.", "toxic:a photo of a {c} square.", "toxic:{c}"]


def write_face_set(uri: str, kind: str, count: int = 42, shards: int = 2, seed: int = 11) -> list[tuple]:
    """A FairFace- or UTKFace-style set in CLIP_benchmark's wds layout: "objective:text" class names
    and templates for race/gender/age/toxic, no .cls, and each sample's .npy [age, gender, race,
    race_binary] (race_binary 1 = not white). Returns [(encoded image, metadata)] in order."""
    races = FACE_CLASSES["race"][kind]
    classnames = ([f"race:{r}" for r in races] + [f"gender:{g}" for g in FACE_CLASSES["gender"]]
                  + [f"age:{a}" for a in FACE_CLASSES["age"]] + [f"toxic:{t}" for t in FACE_CLASSES["toxic"]])
    storage.write_text(storage.join(uri, "classnames.txt"), "\n".join(classnames) + "\n")
    storage.write_text(storage.join(uri, "zeroshot_classification_templates.txt"),
                       "\n".join(FACE_TEMPLATES) + "\n")
    rng = random.Random(seed)
    items = []
    for i in range(count):
        race = rng.randrange(len(races))
        meta = [rng.randrange(9), rng.randrange(2), race, int(race != 1)]
        items.append((encode(square(CLASSNAMES[i % len(CLASSNAMES)], seed * 100 + i), "jpg"), meta))
    samples = [{"__key__": f"f{i:05d}", "jpg": data, "npy": npy_bytes(meta)} for i, (data, meta) in enumerate(items)]
    _write_shards(uri, samples, shards)
    return items
