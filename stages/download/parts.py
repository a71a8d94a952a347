"""One way to split a URL list into parts: the shard numbering, and which shards each part owns.

Every shard of the whole list has one global id, numbered as img2dataset numbers the shards of a
folder: file by file, `ceil(rows / samples_per_shard)` shards each. A part is a contiguous range
of those ids. With at least as many files as parts, the cuts fall on file boundaries (each part
reads only its own files, balanced by shard count); with fewer, they fall on shard boundaries
(row ranges of `samples_per_shard` rows). So any number of parts, run anywhere and in any order,
write shards whose names cannot collide and whose union is exactly what one task would write.

The Kubernetes Indexed Job (`--part-index auto` reads `JOB_COMPLETION_INDEX`) and the pipeline's
fan-out both use `--num-parts N --part-index I`, so both go through `plan()`. Inside a part,
img2dataset's own process pool spreads the part's shards over `--processes`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from stages.common.errors import ConfigError
from stages.download.urllist import InputFile

INDEX_ENV = "JOB_COMPLETION_INDEX"


@dataclass(frozen=True)
class FileShards:
    """One input file's place in the global shard numbering."""

    uri: str
    input_format: str
    rows: int
    first_shard: int
    shards: int

    @property
    def end_shard(self) -> int:
        return self.first_shard + self.shards


@dataclass(frozen=True)
class Part:
    index: int
    count: int
    first_shard: int
    end_shard: int  # exclusive
    files: tuple[FileShards, ...]  # the input files holding this part's shards

    @property
    def shard_ids(self) -> range:
        return range(self.first_shard, self.end_shard)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"


def number_shards(files: list[InputFile], samples_per_shard: int) -> list[FileShards]:
    out, next_id = [], 0
    for f in files:
        n = math.ceil(f.rows / samples_per_shard)
        out.append(FileShards(f.uri, f.input_format, f.rows, next_id, n))
        next_id += n
    return out


def _file_cuts(files: list[FileShards], num_parts: int) -> list[int]:
    """Shard ids where parts start, on file boundaries, each part at least one file."""
    total = files[-1].end_shard
    ends = [f.end_shard for f in files]  # a cut after file j starts the next part at ends[j]
    cuts, last = [0], -1
    for k in range(1, num_parts):
        lo, hi = last + 1, len(files) - (num_parts - k) - 1  # leave a file for each later part
        target = total * k / num_parts
        j = min(range(lo, hi + 1), key=lambda i: (abs(ends[i] - target), i))
        cuts.append(ends[j])
        last = j
    return cuts


def plan(files: list[FileShards], num_parts: int) -> list[Part]:
    """Split the numbered files into num_parts parts (some may be empty when shards are few)."""
    if num_parts < 1:
        raise ConfigError(f"--num-parts {num_parts} must be at least 1")
    total = files[-1].end_shard if files else 0
    if len(files) >= num_parts:
        starts = _file_cuts(files, num_parts)
    else:
        starts = [total * k // num_parts for k in range(num_parts)]
    bounds = [*starts, total]
    parts = []
    for i in range(num_parts):
        lo, hi = bounds[i], bounds[i + 1]
        owned = tuple(f for f in files if f.first_shard < hi and f.end_shard > lo)
        parts.append(Part(i, num_parts, lo, hi, owned))
    return parts


def resolve_index(given: str, num_parts: int) -> int:
    """--part-index as a number; 'auto' reads the Indexed Job's completion index."""
    text = given
    if given == "auto":
        text = os.environ.get(INDEX_ENV, "")
        if not text:
            raise ConfigError(f"--part-index auto: ${INDEX_ENV} is not set (it is set in the pods of "
                              "a Kubernetes Job with completionMode: Indexed)")
    try:
        index = int(text)
    except ValueError:
        raise ConfigError(f"--part-index {given!r}"
                          + (f" (${INDEX_ENV}={text!r})" if given == "auto" else "")
                          + " is not a number or 'auto'") from None
    if not 0 <= index < num_parts:
        raise ConfigError(f"--part-index {index} is not in 0..{num_parts - 1} (--num-parts {num_parts})")
    return index


def shard_digits(total_shards: int) -> int:
    """Digits of the shard names: img2dataset's 5, more when a list has 100000 shards or more."""
    return max(5, len(str(max(total_shards - 1, 0))))
