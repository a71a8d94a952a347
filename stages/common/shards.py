"""Webdataset shards on any fsspec store, as the train and evaluate stages both read them.

One owner for: the fsspec opener registration in webdataset, the download manifest, the rank and
worker shard assignment, the sample keys (which member is the image, which the caption) and the
safe reading of a shard's samples. Nothing here unpickles, `torch.load`s or inflates a member:
samples are raw bytes per member until `SampleKeys` picks the image (decoded with PIL, under a
pixel limit), the caption (UTF-8, or one field of the `.json` member) or the class label (an
integer). Every other member is counted as ignored, never decoded.

Shards are read member by member as webdataset's `tar_file_iterator` does, and grouped into
samples as its `group_by_keys` does, but here, because each sample must carry its offset in the
shard and the byte offset of its header: a resume seeks straight to a saved sample instead of
reading the bytes before it.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from stages.common import storage
from stages.common.errors import ConfigError, DataError

FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "memory", "sftp", "hf")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DEFAULT_IMAGE_KEY = ";".join(IMAGE_KEYS)
DEFAULT_CAPTION_KEY = "txt"
LABEL_KEY = "cls"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta default


# ---------------------------------------------------------------- webdataset + fsspec

def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    return storage.open_read(url, mode)


def register_fsspec_openers() -> None:
    """Let webdataset's own readers open shards on any fsspec store (it has no s3:// handler)."""
    import webdataset  # noqa: F401 - puts webdataset.gopen (the module) in sys.modules

    gopen_module = sys.modules["webdataset.gopen"]  # webdataset.gopen is also a function
    for scheme in FSSPEC_SCHEMES:
        gopen_module.gopen_schemes[scheme] = _gopen_fsspec


# ---------------------------------------------------------------- the download manifest

def find_manifest(spec: str) -> str | None:
    """The manifest a spec names: the .json itself, or manifest.json in a run or data/ folder."""
    stripped = spec.rstrip("/")
    if stripped.endswith(".json"):
        return stripped if storage.exists(stripped) else None
    for candidate in (storage.join(stripped, "manifest.json"), storage.join(stripped, "data", "manifest.json")):
        if storage.exists(candidate):
            return candidate
    return None


def read_split(manifest_uri: str, split: str) -> tuple[list[str], list[int | None]]:
    """(shard URIs, sample count of each or None) of one split of a download manifest."""
    try:
        manifest = storage.read_json(manifest_uri)
    except Exception as exc:
        raise DataError(f"cannot read the manifest {manifest_uri}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{manifest_uri} is not a clipforge manifest (no 'splits'); see docs/CONTRACTS.md")
    shards = list((manifest["splits"].get(split) or {}).get("shards", []))
    counts = {s.get("uri"): s.get("samples") for s in manifest.get("shards", []) if isinstance(s, dict)}
    return shards, [counts.get(s) for s in shards]


# ---------------------------------------------------------------- who reads what

def assign(items: list, rank: int, world_size: int, worker: int, num_workers: int) -> list:
    """The items one worker of one rank takes: every world_size-th for a rank, every
    num_workers-th of those for a worker (open_clip's split). With fewer items than slots a slot
    borrows one, so no worker is left empty."""
    if not items:
        return []
    mine = items[rank::world_size] or [items[rank % len(items)]]
    return mine[worker::num_workers] or [mine[worker % len(mine)]]


def rank_shards(shards: list[str], rank: int, world_size: int) -> tuple[list[str], bool]:
    """For reading every sample exactly once (evaluation): this rank's shards, or (all shards,
    True) when there are too few to give each rank one and the ranks must split samples instead."""
    if world_size <= 1:
        return shards, False
    if len(shards) >= world_size:
        return shards[rank::world_size], False
    return shards, True


# ---------------------------------------------------------------- reading samples

def _group(files: Iterator[dict]) -> Iterator[dict]:
    """Consecutive members with the same key form one sample (suffixes lower-cased); a repeated
    suffix starts a new sample. A shard cut off after a whole sample still yields that sample.
    With members' byte offsets known, a sample has "__byte__" (its first header) and "__next__"
    (the next sample's first header; -1 after the last sample)."""
    current: dict | None = None
    try:
        for f in files:
            prefix, suffix = _split_name(f["fname"])
            if prefix is None:
                continue
            if current is None or prefix != current["__key__"] or suffix in current:
                if current is not None:
                    current["__next__"] = f.get("byte")
                    yield current
                current = {"__key__": prefix, "__byte__": f.get("byte")}
            current[suffix] = f["data"]
    except Exception:
        if current is not None:
            current["__next__"] = None
            yield current
        raise
    # not in a `finally`: a consumer that stops early closes us, and a closed generator must not yield
    if current is not None:
        current["__next__"] = -1 if current.get("__byte__") is not None else None  # -1: the end
        yield current


def _members(stream: Any, base: int | None) -> Iterator[dict]:
    """{"fname", "data", "byte"} of the members webdataset's tar_file_iterator would yield, with
    the byte offset of each header (None in a compressed tar). Written here because
    tar_file_iterator does not say where a member is, which a resume needs to seek back to it."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    plain = base is not None and getattr(tar.fileobj, "comptype", "tar") == "tar"
    for info in tar:
        if not _is_member(info):
            continue
        data = tar.extractfile(info).read()
        yield {"fname": info.name, "data": data, "byte": base + info.offset if plain else None}
        tar.members = []


def _split_name(fname: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    prefix, suffix = base_plus_ext(fname)
    return (prefix, suffix.lower()) if prefix is not None else (None, None)


def _is_member(info: tarfile.TarInfo) -> bool:
    """The members tar_file_iterator yields (regular files that are not webdataset metadata)."""
    name = info.name
    return info.isreg() and not ("/" not in name and name.startswith("__") and name.endswith("__")) \
        and not _META.match(name)


def _seek_to_sample(stream: Any, offset: int) -> bool:
    """Move a seekable stream to the header of sample number `offset`; False when the shard has
    fewer samples. Only headers are read: tarfile seeks over each member's data."""
    tar = tarfile.open(fileobj=stream, mode="r:")
    index, key, suffixes = -1, None, set()
    for info in tar:
        prefix, suffix = _split_name(info.name) if _is_member(info) else (None, None)
        if prefix is None:
            continue
        if prefix != key or suffix in suffixes:
            index, key, suffixes = index + 1, prefix, set()
            if index == offset:
                stream.seek(info.offset)
                return True
        suffixes.add(suffix)
    return False


def _seekable(stream: Any) -> bool:
    return bool(getattr(stream, "seekable", lambda: False)())


def iter_samples(url: str, start: int = 0, keep: Callable[[int], bool] | None = None,
                 stop: int | None = None, byte: int | None = None) -> Iterator[tuple[int, dict]]:
    """(offset in the shard, sample) for offsets in [start, stop) that `keep` accepts.

    A sample is {"__key__", "__url__", "__byte__", "__next__", suffix: bytes, ...}. `byte`, the
    header offset of sample `start` (a sample's "__byte__"), lets the reader seek straight to it;
    without it the tar headers before it are walked (no data read). Errors reading the shard
    propagate after the whole samples before them.
    """
    with storage.open_read(url) as stream:
        offset, skip = 0, 0
        if byte == -1:  # the shard's end
            return
        if start > 0 and _seekable(stream):
            if byte is not None:
                stream.seek(byte)
            elif not _seek_to_sample(stream, start):
                return
            offset = start
        elif start > 0:
            skip = start  # a stream that cannot seek: read past the samples before `start`
        base = stream.tell() if _seekable(stream) else None
        for sample in _group(_members(stream, base)):
            if stop is not None and offset >= stop:
                return
            if offset >= skip and (keep is None or keep(offset)):
                sample["__url__"] = url
                yield offset, sample
            offset += 1


def read_sample_at(url: str, offsets_bytes: list[tuple[int, int]]) -> Iterator[tuple[int, dict]]:
    """The samples at these (offset, header byte) positions of one shard, one seek each."""
    with storage.open_read(url) as stream:
        for offset, byte in sorted(offsets_bytes, key=lambda p: p[1]):
            stream.seek(byte)
            for sample in _group(_members(stream, byte)):
                sample["__url__"] = url
                yield offset, sample
                break


# ---------------------------------------------------------------- which member is what

class Unusable(Exception):
    """A sample that cannot be used; `reason` is one of the counted reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class SampleKeys:
    """Where a sample's image and caption are: `image` alternatives joined by ';' (the first present
    wins), `caption` a member suffix or `json:FIELD` (a field of the .json member), and the pixel
    limit above which an image is skipped without being decoded."""

    image: str = DEFAULT_IMAGE_KEY
    caption: str = DEFAULT_CAPTION_KEY
    max_pixels: int = 0  # 0: PIL's own limit (Image.MAX_IMAGE_PIXELS)

    @classmethod
    def from_flags(cls, image: str, caption: str, max_pixels: int | None = None) -> SampleKeys:
        keys = cls(image or DEFAULT_IMAGE_KEY, caption or DEFAULT_CAPTION_KEY, int(max_pixels or 0))
        keys.check()
        return keys

    def check(self) -> None:
        if not self.image_keys or any(not k or "." in k or ":" in k for k in self.image_keys):
            raise ConfigError(f"--image-key {self.image!r}: give member suffixes joined by ';', e.g. "
                              f"{DEFAULT_IMAGE_KEY}")
        kind, _, field = self.caption.partition(":")
        if not kind or (field == "" and ":" in self.caption) or (field and kind != "json"):
            raise ConfigError(f"--caption-key {self.caption!r}: give a member suffix (txt, caption) "
                              "or json:FIELD for a field of the .json member")
        if self.max_pixels < 0:
            raise ConfigError(f"--max-image-pixels {self.max_pixels}: must not be negative")

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(k.strip().lower() for k in self.image.split(";") if k.strip())

    @property
    def caption_member(self) -> str:
        return self.caption.partition(":")[0].lower()

    @property
    def wanted(self) -> set[str]:
        return {*self.image_keys, self.caption_member, LABEL_KEY}

    def pixel_limit(self) -> int:
        from PIL import Image

        return self.max_pixels or int(Image.MAX_IMAGE_PIXELS or 0)

    def image_bytes(self, sample: dict) -> bytes:
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            raise Unusable("no_image_key", f"no .{' / .'.join(self.image_keys)} member")
        return sample[key]

    def caption_text(self, sample: dict) -> str:
        data = sample.get(self.caption_member)
        if data is None:
            raise Unusable("no_caption_key", f"no .{self.caption_member} member")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Unusable("bad_caption", f".{self.caption_member} is not UTF-8") from exc
        _, _, field = self.caption.partition(":")
        if not field:
            return text
        try:
            value = json.loads(text).get(field)
        except (ValueError, AttributeError) as exc:
            raise Unusable("bad_caption", ".json is not a JSON object") from exc
        if not isinstance(value, str) or not value.strip():
            raise Unusable("no_caption_key", f".json has no string field {field!r}")
        return value

    def open_image(self, data: bytes, draft_size: int = 0):
        """The image, RGB, decoded (a JPEG in draft mode when draft_size is given); too many pixels
        or undecodable bytes raise Unusable before any pixel is decoded."""
        from PIL import Image

        limit = self.pixel_limit()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Unusable("too_many_pixels", str(exc)) from exc
        except Exception as exc:
            raise Unusable("undecodable_image", f"{type(exc).__name__}: {exc}") from exc
        if limit and img.size[0] * img.size[1] > limit:
            raise Unusable("too_many_pixels", f"{img.size[0]}x{img.size[1]} > {limit} pixels")
        try:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
        except Exception as exc:
            raise Unusable("undecodable_image", f"{type(exc).__name__}: {exc}") from exc

    def label(self, sample: dict) -> int:
        data = sample.get(LABEL_KEY)
        if data is None:
            raise Unusable("no_label", f"no .{LABEL_KEY} member")
        try:
            return int(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise Unusable("bad_label", f".{LABEL_KEY} is not an integer") from exc

    def ignored(self, sample: dict) -> list[str]:
        """The members of a sample that nothing reads (never decoded)."""
        return [k for k in sample if not k.startswith("__") and k not in self.wanted]


def describe_keys(samples: list[dict]) -> str:
    """'jpg, json, caption (12 samples)': the member suffixes seen in some samples."""
    seen: Counter = Counter(k for s in samples for k in s if not k.startswith("__"))
    return ", ".join(f".{k}" for k, _ in seen.most_common()) + f" ({len(samples)} samples)"


def key_hint(keys: SampleKeys, samples: list[dict]) -> str:
    """How to point at the image and caption members these samples do have."""
    seen = {k for s in samples for k in s if not k.startswith("__")}
    hints = []
    if not seen & set(keys.image_keys):
        images = [k for k in seen if k in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")]
        hints.append(f"--image-key {images[0]}" if images else "--image-key SUFFIX")
    if keys.caption_member not in seen:
        texts = [k for k in ("caption", "text", "txt") if k in seen]
        if texts:
            hints.append(f"--caption-key {texts[0]}")
        if "json" in seen:
            hints.append("--caption-key json:caption (a field of the .json member)")
    return " or ".join(hints) if hints else "--image-key / --caption-key"


def probe(shard_urls: list[str], keys: SampleKeys, what: str, samples: int = 16,
          need: str = "caption") -> None:
    """Read the first samples of the first shards and check that they have a usable image and a
    caption (need="caption"), class label (need="label") or nothing more (need="image"); one clear DataError otherwise, listing
    the member keys found and how to point at them. Cheap: a few samples, before any model."""
    seen: list[dict] = []
    reasons: Counter = Counter()
    last_error = ""
    for url in shard_urls[:3]:
        try:
            for _, sample in iter_samples(url, stop=samples - len(seen)):
                seen.append(sample)
                try:
                    keys.open_image(keys.image_bytes(sample))
                    if need == "caption":
                        keys.caption_text(sample)
                    elif need == "label":
                        keys.label(sample)
                    return
                except Unusable as exc:
                    reasons[exc.reason] += 1
        except Exception as exc:  # noqa: BLE001 - an unreadable first shard: try the next
            reasons["unreadable_shard"] += 1
            last_error = f"cannot read {url}: {type(exc).__name__}: {exc}"
        if len(seen) >= samples:
            break
    if not seen:
        raise DataError(f"{what}: {last_error or f'the first shards {shard_urls[:3]} hold no samples'}")
    counted = ", ".join(f"{k} {v}" for k, v in reasons.most_common())
    wanted = f"--caption-key {keys.caption}" if need == "caption" else f".{LABEL_KEY} (class label)"
    raise DataError(f"{what}: none of the first {len(seen)} samples has a usable image "
                    f"(--image-key {keys.image}) and {wanted} ({counted}); the samples have "
                    f"{describe_keys(seen)}; try {key_hint(keys, seen)}")
