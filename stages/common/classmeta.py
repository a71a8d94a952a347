"""Built-in class names and prompt templates, by dataset name, from the libraries that ship them.

ImageNet and the sets that share its 1000 classes (ImageNet-V2, ImageNet-Sketch, open_clip_train's
--imagenet-val folders) take open_clip's `IMAGENET_CLASSNAMES` and `OPENAI_IMAGENET_TEMPLATES`;
every other set takes CLIP_benchmark's package data (`en_classnames.json`,
`en_zeroshot_classification_templates.json`). Nothing is copied into clipforge: the lists are read
from the installed packages, so they follow the pinned versions.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

from stages.common.errors import DataError

# Names (after normalising) that mean the 1000 ImageNet classes in their usual order.
IMAGENET_NAMES = frozenset({"imagenet", "imagenet1k", "imagenet-1k", "imagenet_1k", "imagenet-val",
                            "imagenet_val", "imagenetv2", "imagenet-v2", "imagenet_v2", "imagenet_sketch",
                            "imagenet-sketch"})
_PREFIXES = ("wds_", "vtab-", "vtab/", "fairness-", "fairness/", "wilds-", "wilds/", "misc-", "misc/")


def normalise(name: str) -> str:
    """`wds_vtab-cifar100_test` -> `cifar100`: DataComp's folder names and CLIP_benchmark's keys."""
    name = re.sub(r"_(test|val|train)$", "", name.strip().lower())
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


@functools.cache
def _clip_benchmark(kind: str) -> dict[str, list[str]]:
    files = {"classnames": "en_classnames.json", "templates": "en_zeroshot_classification_templates.json"}
    try:
        text = resources.files("clip_benchmark.datasets").joinpath(files[kind]).read_text("utf-8")
    except ModuleNotFoundError as exc:
        raise DataError("built-in class names and templates need the clip_benchmark package "
                        "(pip install 'clipforge[evaluate]')") from exc
    return json.loads(text)


def _openai_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def builtin_classnames(name: str) -> list[str] | None:
    key = normalise(name)
    if key in IMAGENET_NAMES:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    names = _clip_benchmark("classnames").get(key)
    return list(names) if names else None


def builtin_templates(name: str) -> list[str] | None:
    key = normalise(name)
    if key in IMAGENET_NAMES:
        return _openai_templates()
    templates = _clip_benchmark("templates").get(key)
    return list(templates) if templates else None


def source(name: str) -> str:
    """Where the built-in lists for a dataset name come from (recorded in the results)."""
    if normalise(name) in IMAGENET_NAMES:
        return "open_clip.zero_shot_metadata (IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES)"
    return "clip_benchmark (en_classnames.json, en_zeroshot_classification_templates.json)"


def known_names() -> list[str]:
    """Every dataset name with built-in class names (for error messages and docs)."""
    return sorted(set(_clip_benchmark("classnames")) | {"imagenet1k", "imagenetv2", "imagenet_sketch"})


def classnames_for(name: str, where: str) -> list[str]:
    names = builtin_classnames(name)
    if names is None:
        raise DataError(f"{where}: missing, and {name!r} (read as {normalise(name)!r}) is not a dataset "
                        f"with built-in class names ({', '.join(known_names())}); add classnames.txt "
                        "with one class name per line, or name the set NAME=URI after a known dataset")
    return names


def templates_for(name: str, where: str) -> list[str]:
    templates = builtin_templates(name)
    if templates is None:
        raise DataError(f"{where}: missing, and {name!r} (read as {normalise(name)!r}) has no built-in "
                        "templates; add zeroshot_classification_templates.txt with one template per "
                        "line, each with {c}")
    return templates
