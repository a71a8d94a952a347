"""Test shards in img2dataset's layout: learnable coloured shapes with captions, plus a manifest.

`make_shards(dir, n_samples, samples_per_shard, image_size, seed)` writes `00000.tar …` (each
sample `<key>.jpg`, `<key>.txt`, `<key>.json`), `NNNNN_stats.json` and `manifest.json`
(docs/CONTRACTS.md) to a local folder or any fsspec URI. The caption names the shape and its
colour, so a tiny CLIP model can learn the pairing in a few hundred steps.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import time

from PIL import Image, ImageDraw

from stages.common import storage

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
           "yellow": (235, 220, 30), "purple": (140, 40, 180), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
NOT_AN_IMAGE = b"this is not an image, just bytes in a .jpg member"


def caption_for(colour: str, shape: str) -> str:
    return f"a photo of a {colour} {shape}"


def draw_shape(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """A shape of one colour on a pale noisy background, at a random place and scale."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    extent = rng.uniform(0.4, 0.8) * size
    x0 = rng.uniform(0, size - extent)
    y0 = rng.uniform(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _shard_bytes(samples: list[tuple[str, bytes, str, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, txt, meta in samples:
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", txt.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    return buf.getvalue()


def _make_samples(shard: int, first: int, count: int, image_size: int, rng: random.Random):
    out = []
    for i in range(first, first + count):
        colour = rng.choice(sorted(COLOURS))
        shape = rng.choice(SHAPES)
        key = f"{shard:05d}{i % 10000:04d}"
        text = caption_for(colour, shape)
        meta = {"key": key, "caption": text, "url": f"http://example.invalid/{i}.jpg",
                "status": "success", "width": image_size, "height": image_size,
                "colour": colour, "shape": shape}
        out.append((key, _jpeg(draw_shape(colour, shape, image_size, rng)), text, meta))
    return out


def make_shards(dir: str, n_samples: int, samples_per_shard: int, image_size: int = 64,
                seed: int = 0, corrupt: bool = False, val_samples: int = 0) -> dict:
    """Write shards + manifest.json under `dir` (any fsspec URI); returns the manifest.

    corrupt=True replaces the first sample's image in shard 0 with bytes that are not an image
    and cuts the last train shard off in the middle of a member (a truncated upload), as a real
    crawl can produce; the manifest still lists the counts the download stage wrote.
    val_samples > 0 adds shards after the train shards, listed as the manifest's val split.
    """
    rng = random.Random(seed)
    storage.makedirs(dir)
    shards, splits = [], {"train": {"shards": [], "samples": 0}, "val": {"shards": [], "samples": 0}}
    plan = [("train", n_samples), ("val", val_samples)]
    index = 0
    for split, total in plan:
        done = 0
        while done < total:
            count = min(samples_per_shard, total - done)
            samples = _make_samples(index, done, count, image_size, rng)
            if corrupt and split == "train" and index == 0:
                key, _, txt, meta = samples[0]
                samples[0] = (key, NOT_AN_IMAGE, txt, meta)
            data = _shard_bytes(samples)
            last_train = split == "train" and done + count >= total
            if corrupt and last_train and index > 0:
                data = _truncate(data)
            uri = storage.join(dir, f"{index:05d}.tar")
            storage.write_bytes(uri, data)
            storage.write_json(storage.join(dir, f"{index:05d}_stats.json"),
                               {"count": count, "successes": count, "failed_to_download": 0})
            shards.append({"uri": uri, "samples": count, "split": split})
            splits[split]["shards"].append(uri)
            splits[split]["samples"] += count
            done += count
            index += 1
    manifest = {
        "format": "clipforge.manifest/1", "run_id": "test", "input": "generated", "data_dir": dir,
        "shards": shards, "splits": splits,
        "split": {"seed": seed, "proportions": _proportions(n_samples, val_samples)},
        "total_samples": n_samples + val_samples, "attempted": n_samples + val_samples,
        "success_rate": 1.0, "failures_by_reason": {}, "elapsed_s": 0.0, "images_per_s": 0.0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(storage.join(dir, "manifest.json"), manifest)
    return manifest


def _truncate(data: bytes) -> bytes:
    """Cut a tar in the middle of the image of its middle sample (after padding is no cut)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    victim = images[len(images) // 2]
    return data[: victim.offset_data + victim.size // 2]


def truncated_survivors(samples_in_shard: int) -> int:
    """How many whole samples a shard cut by corrupt=True still holds."""
    return samples_in_shard // 2


def _proportions(train: int, val: int) -> dict[str, float]:
    total = max(1, train + val)
    return {"train": train / total, "val": val / total}
