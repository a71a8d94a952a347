"""Eval sets in CLIP_benchmark's `wds` layout, and the download stage's val split, from any store.

Everything here is checked before a model is built: a bad eval set fails in seconds, naming the file.
"""

from __future__ import annotations

import dataclasses
import re

from stages.common import storage
from stages.common.errors import DataError
from stages.common.shards import SampleKeys, find_manifest, read_split

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
MULTILABEL = "zeroshot_multilabel"  # several classes per image: `cls` holds indices, e.g. "3 7"
LINEAR_PROBE = "linear_probe"  # CLIP_benchmark's: a linear head on frozen features of the train split


@dataclasses.dataclass
class EvalSet:
    name: str
    uri: str
    task: str
    shards: list[str]
    classnames: list[str] = dataclasses.field(default_factory=list)
    templates: list[str] = dataclasses.field(default_factory=list)
    samples: int | None = None  # when known up front (the manifest says)
    keys: SampleKeys = dataclasses.field(default_factory=SampleKeys)
    max_samples: int | None = None  # --max-samples: evaluate at most this many
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)  # members never decoded, by suffix
    train_shards: list[str] = dataclasses.field(default_factory=list)  # linear probe: the train split
    groups: str = ""  # subgroup metrics (stages.evaluate.subgroups) read from each sample's .npy
    builtin: dict[str, str] = dataclasses.field(default_factory=dict)  # list -> where it came from


def open_eval_set(name: str, uri: str, linear_probe: bool = False) -> EvalSet:
    """Read and check a CLIP_benchmark wds folder: dataset type, class names, templates, shards.

    Class names and templates the folder lacks come from the built-in ones for its dataset name."""
    from stages.common import classmeta as metadata
    from stages.evaluate import subgroups

    uri = uri.rstrip("/")
    task = _dataset_type(uri)
    shards = _test_shards(uri)
    if task == RETRIEVAL:
        if linear_probe:
            raise DataError(f"{uri}: a retrieval set cannot be evaluated with a linear probe")
        return EvalSet(name, uri, task, shards)
    names_uri = storage.join(uri, "classnames.txt")
    templates_uri = storage.join(uri, "zeroshot_classification_templates.txt")
    builtin = {}
    if storage.exists(names_uri):
        classnames = _classnames(names_uri)
    else:
        classnames, builtin["classnames"] = metadata.classnames_for(name, names_uri), metadata.source(name)
    if linear_probe:
        return EvalSet(name, uri, LINEAR_PROBE, shards, classnames, [], builtin=builtin,
                       train_shards=_test_shards(uri, "train"))
    if storage.exists(templates_uri):
        templates = _templates(templates_uri)
    else:
        templates, builtin["templates"] = metadata.templates_for(name, templates_uri), metadata.source(name)
    return EvalSet(name, uri, task, shards, classnames, templates, groups=subgroups.evaluator_for(name),
                   builtin=builtin)


def open_val_split(uri: str) -> EvalSet:
    """The val split of a download manifest (given as manifest.json, its data/ folder or the run)."""
    manifest_uri = find_manifest(uri)
    if manifest_uri is None:
        raise DataError(f"--val-data {uri}: no manifest.json there (give the manifest, its data/ folder "
                        "or the run folder)")
    shards, counts = read_split(manifest_uri, "val")
    if not shards:
        raise DataError(f"{manifest_uri}: the manifest has no val split with shards "
                        "(splits.val.shards); download with a val proportion > 0")
    samples = sum(counts) if all(c is not None for c in counts) else None
    return EvalSet("val", manifest_uri, RETRIEVAL, shards, samples=samples)


def _dataset_type(uri: str) -> str:
    type_uri = storage.join(uri, "dataset_type.txt")
    if not storage.exists(type_uri):
        return CLASSIFICATION
    kind = storage.read_text(type_uri).strip().lower()
    if kind == "retrieval":
        return RETRIEVAL
    if kind in ("", "classification", "zeroshot_classification"):
        return CLASSIFICATION
    if kind in ("multilabel", "multilabel_classification"):
        return MULTILABEL
    raise DataError(f"{type_uri}: unknown dataset type {kind!r} (expected 'retrieval', 'classification' "
                    "or 'multilabel')")


def _test_shards(uri: str, split: str = "test") -> list[str]:
    test = storage.join(uri, split)
    nshards_uri = storage.join(test, "nshards.txt")
    present = {u.rsplit("/", 1)[-1]: u for u in storage.listdir(test) if u.endswith(".tar")}
    if storage.exists(nshards_uri):
        text = storage.read_text(nshards_uri).strip()
        if not text.isdigit() or int(text) == 0:
            raise DataError(f"{nshards_uri}: expected a positive shard count, found {text!r}")
        wanted = [f"{i}.tar" for i in range(int(text))]
        missing = [n for n in wanted if n not in present]
        if missing:
            raise DataError(f"{nshards_uri} says {text} shards but {test}/ lacks {missing[:5]}")
        return [present[n] for n in wanted]
    if not present:
        raise DataError(f"{test}/: no shards (expected nshards.txt and 0.tar, 1.tar, ... "
                        "in CLIP_benchmark's wds layout)")
    return [present[n] for n in sorted(present, key=_shard_order)]


def _shard_order(name: str) -> tuple[int, str]:
    m = re.match(r"(\d+)\.tar$", name)
    return (int(m.group(1)) if m else -1, name)


def _classnames(uri: str) -> list[str]:
    if not storage.exists(uri):
        raise DataError(f"{uri}: missing; a classification eval set needs one class name per line "
                        "(or dataset_type.txt saying 'retrieval')")
    names = [line.strip() for line in storage.read_text(uri).splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{uri}: empty; expected one class name per line")
    return names


def _templates(uri: str) -> list[str]:
    if not storage.exists(uri):
        raise DataError(f"{uri}: missing; expected one prompt template per line, each with {{c}}")
    templates = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if "{c}" not in line:
            raise DataError(f"{uri} line {number}: template {line!r} has no {{c}} for the class name")
        templates.append(line)
    if not templates:
        raise DataError(f"{uri}: empty; expected one prompt template per line, each with {{c}}")
    return templates
