"""WinoGAViL, DataComp's `misc/winogavil`: pick a cue's associated images among 5-12 candidates.

DataComp reads it with `datasets.load_dataset("nlphuji/winogavil", split="test",
cache_dir=<data root>/hf_cache)`, so the set is that Hugging Face datasets cache under the suite
root (what DataComp's `download_evalsets.py` leaves there). It is opened with the `datasets`
library's own offline cache reader: nothing is fetched from the Hub and nothing is written under
the root. A root on another store is copied first (the dataset's cache folder; images the cache
holds only as paths into `hf_cache/downloads/` are then read from the same root).

The scorer is DataComp's `eval_utils/wino_eval.py`: the cue as "A/An <cue>", the candidates ranked
by cosine similarity, the top as many as there are associations predicted, each example's Jaccard
index (scikit-learn's), averaged over all examples and by candidate count.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from stages.common import distributed, storage
from stages.common.distributed import DistInfo
from stages.common.errors import DataError
from stages.evaluate.model import LoadedModel

HF_DATASET = "nlphuji/winogavil"
CACHE_FOLDER = "hf_cache"  # DataComp's cache_dir under its data root
ASSOCIATION = "association"  # the task type, as results.json names it
COLUMNS = ("cue", "candidates", "associations", "candidate_images")


@dataclasses.dataclass
class WinoSet:
    name: str
    uri: str  # the hf_cache folder
    dataset: object  # a datasets.Dataset in arrow format: rows as tables, images not decoded
    max_samples: int | None = None


def cache_uri(root: str) -> str:
    return storage.join(root.rstrip("/"), CACHE_FOLDER)


def dataset_folder(cache: str) -> str:
    """Where the datasets library keeps nlphuji/winogavil inside a cache folder."""
    return storage.join(cache, HF_DATASET.replace("/", "___"))


def present(root: str) -> bool:
    return storage.exists(dataset_folder(cache_uri(root)))


def open_set(name: str, cache: str) -> WinoSet:
    """The test split from the cache, its columns and associations checked; no image decoded."""
    from datasets.packaged_modules.cache.cache import Cache

    local = _reading_copy(cache)
    try:
        builder = Cache(cache_dir=local, dataset_name=HF_DATASET.split("/")[1], repo_id=HF_DATASET,
                        version="auto", hash="auto")
        dataset = builder.as_dataset(split="test")
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise DataError(f"{dataset_folder(cache)}: no readable {HF_DATASET} test split in this Hugging Face "
                        f"datasets cache ({exc})") from exc
    lacking = [c for c in COLUMNS if c not in dataset.column_names]
    if lacking:
        raise DataError(f"{dataset_folder(cache)}: the {HF_DATASET} test split lacks column(s) {lacking} "
                        f"(has {dataset.column_names})")
    _check_examples(dataset, cache)
    # Rows as arrow: images stay {bytes, path} (not decoded), and no cast writes a file next to the cache.
    return WinoSet(name, cache, dataset.with_format("arrow"))


def _reading_copy(cache: str) -> str:
    """A private cache folder holding the dataset: the reader writes its lock file there, never into
    the suite root (which may be read-only). A local dataset is linked, a remote one copied."""
    local = tempfile.mkdtemp(prefix="clipforge-winogavil-")
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    target = os.path.join(local, HF_DATASET.replace("/", "___"))
    source = storage.local_path(dataset_folder(cache))
    if source is not None:
        os.symlink(os.path.abspath(source), target)
    else:
        storage.download_folder(dataset_folder(cache), target)
    return local


def _check_examples(dataset, cache: str) -> None:
    """Each example: an association among its candidates, one image per candidate, every image there."""
    import pyarrow.compute as pc

    where = dataset_folder(cache)

    table = dataset.select_columns(["cue", "candidates", "associations"]).to_dict()
    empty = [index for index, cue in enumerate(table["cue"]) if not (cue or "").strip()]
    if empty:
        raise DataError(f"{where}: {HF_DATASET} example(s) {empty[:5]} have an empty cue")
    for index, (candidates, associations) in enumerate(zip(table["candidates"], table["associations"],
                                                           strict=True)):
        if not np.isin(candidates, associations).any():
            raise DataError(f"{where}: {HF_DATASET} example {index} has no association among its candidates "
                            f"({associations} vs {candidates})")
    images = dataset.data.column("candidate_images")  # list<struct<bytes, path>>, memory-mapped
    counts = pc.list_value_length(images).to_pylist()
    for index, (count, candidates) in enumerate(zip(counts, table["candidates"], strict=True)):
        if count != len(candidates):
            raise DataError(f"{where}: {HF_DATASET} example {index} has {count} images for "
                            f"{len(candidates)} candidates")
    flat = pc.list_flatten(images)
    by_path = pc.filter(pc.struct_field(flat, "path"), pc.is_null(pc.struct_field(flat, "bytes"))).to_pylist()
    if by_path:
        _check_paths(by_path, cache)


def _check_paths(paths: list[str], cache: str) -> None:
    """Images the cache holds as paths are all readable (one listing of downloads/ on a remote store)."""
    listed = None if storage.local_path(cache) is not None else set(
        storage.walk_files(storage.join(cache, "downloads")))
    for path in paths:
        uri = _image_uri(path, cache)
        if not (storage.exists(uri) if listed is None else uri in listed):
            raise DataError(f"{cache}: {HF_DATASET} image {path!r} is missing (looked for {uri})")


def _image_uri(path: str, cache: str) -> str:
    """Where an image stored as a path is read: the path itself when it exists on this machine, else
    its part under downloads/ in the cache, which may have been moved or copied to another store."""
    if path and storage.local_path(cache) is not None and os.path.exists(path):
        return path
    _, sep, rest = (path or "").partition("/downloads/")
    if not sep:
        raise DataError(f"{cache}: a {HF_DATASET} image is neither stored in the cache nor a path under its "
                        f"downloads/: {path!r}")
    return storage.join(cache, "downloads", rest)


def clip_prompt(cue: str) -> str:
    """DataComp's get_clip_prompt."""
    cue = cue.lower()
    return f"An {cue}" if cue[0] in "aeiou" else f"A {cue}"


def _image(entry: dict, wino: WinoSet):
    from PIL import Image

    if entry.get("bytes"):
        return Image.open(io.BytesIO(entry["bytes"]))
    return Image.open(io.BytesIO(storage.read_bytes(_image_uri(entry["path"], wino.uri))))


@torch.inference_mode()
def _score(example: dict, wino: WinoSet, loaded: LoadedModel, device: torch.device, amp: Callable) -> float:
    from sklearn.metrics import jaccard_score

    images = torch.stack([loaded.preprocess(_image(e, wino)) for e in example["candidate_images"]])
    text = loaded.tokenizer([clip_prompt(example["cue"])])
    with amp():
        image_feats = loaded.model.encode_image(images.to(device), normalize=True).float()
        text_feats = loaded.model.encode_text(text.to(device), normalize=True).float()
    similarity = (text_feats @ image_feats.T).squeeze(0).cpu().numpy()
    y_true = np.isin(example["candidates"], example["associations"])
    top = np.argsort(similarity)[-int(y_true.sum()):]
    return float(jaccard_score(y_true, np.isin(np.arange(len(images)), top)))


def metrics(sizes: np.ndarray, jaccard: np.ndarray) -> dict[str, float]:
    """DataComp's keys; a candidate count no example has is not listed (DataComp would give NaN)."""
    groups = {"avg_jaccard_score": np.ones_like(sizes, dtype=bool), "jaccard_score_5": sizes == 5,
              "jaccard_score_6": sizes == 6, "jaccard_score_10": sizes == 10, "jaccard_score_12": sizes == 12,
              "jaccard_score_5-6": sizes <= 6, "jaccard_score_10-12": sizes >= 10}
    return {key: float(jaccard[mask].mean()) for key, mask in groups.items() if mask.any()}


def evaluate(wino: WinoSet, loaded: LoadedModel, device: torch.device, amp: Callable, ctx: DistInfo,
             log: logging.Logger) -> dict:
    """The set's metrics (the same on every rank); each rank scores every world-th example."""
    started = time.time()
    total = min(len(wino.dataset), wino.max_samples or len(wino.dataset))
    mine = []
    for index in range(ctx.rank, total, ctx.world_size):
        example = wino.dataset[index].to_pylist()[0]
        mine.append((index, len(example["candidates"]), _score(example, wino, loaded, device, amp)))
    rows = sorted(row for part in distributed.gather(mine, ctx) for row in part)
    sizes, jaccard = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    elapsed = time.time() - started
    log.info("%s: %d examples in %.1fs", wino.name, len(rows), elapsed)
    return {"task": ASSOCIATION, "uri": wino.uri, "samples": len(rows), "metrics": metrics(sizes, jaccard),
            "elapsed_s": round(elapsed, 3), "ignored_members": {}}
