"""Per-sample `.npy` members: a multilabel set's multi-hot target (CLIP_benchmark's wds layout
with dataset_type.txt 'multilabel') and DataComp's WILDS/fairness metadata.

Read with numpy's `allow_pickle=False`: an object array is refused, never unpickled.
"""

from __future__ import annotations

import io

from stages.common.shards import Unusable

METADATA_KEY = "npy"


def metadata(sample: dict):
    """The sample's .npy member as a 1-D integer array, or None when it has none."""
    import numpy as np

    data = sample.get(METADATA_KEY)
    if data is None:
        return None
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise Unusable("bad_metadata", f".{METADATA_KEY} is not a plain numpy array: {exc}") from exc
    return array.reshape(-1).astype("int64")
