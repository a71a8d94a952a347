"""Deterministic split of shards into named parts (train/val/...), as DALLE2's decoder trainer does.

The whole shard is the unit, so a sample never lands in two splits, and the same shard list,
seed and proportions always give the same split.
"""

from __future__ import annotations

import math
import random

from stages.common.errors import ConfigError


def parse_proportions(text: str) -> dict[str, float]:
    """'train=0.9,val=0.1' → {'train': 0.9, 'val': 0.1}; the proportions must sum to 1."""
    props: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--split-proportions {text!r}: expected name=fraction pairs such as "
                              "train=0.9,val=0.1")
        try:
            props[name] = float(value)
        except ValueError:
            raise ConfigError(f"--split-proportions {text!r}: {value!r} is not a number") from None
        if not 0 <= props[name] <= 1:
            raise ConfigError(f"--split-proportions {text!r}: {name}={value} is not between 0 and 1")
    if not props:
        raise ConfigError("--split-proportions is empty: give e.g. train=0.9,val=0.1")
    total = sum(props.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"--split-proportions {text!r} sums to {total:g}, not 1")
    return props


def split_counts(n: int, proportions: dict[str, float]) -> dict[str, int]:
    """How many of n shards each split gets: nearest whole numbers that add up to n.

    Every split with a positive proportion gets at least one shard when there are enough shards,
    so a small run still has a validation shard.
    """
    exact = {name: p * n for name, p in proportions.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (exact[k] - counts[k], proportions[k]), reverse=True)
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    wanted = [k for k, p in proportions.items() if p > 0]
    if n >= len(wanted):
        for name in wanted:
            if counts[name] == 0:
                donor = max(counts, key=lambda k: counts[k])
                counts[donor] -= 1
                counts[name] = 1
    return counts


def split_shards(shards: list[str], proportions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Shuffle the (sorted) shard URIs with the seed and cut them by the proportions."""
    order = sorted(shards)
    random.Random(seed).shuffle(order)
    out: dict[str, list[str]] = {}
    start = 0
    for name, count in split_counts(len(order), proportions).items():
        out[name] = sorted(order[start:start + count])
        start += count
    return out
