"""Fixtures of the trainer's tests: one set of learnable shards for the whole session."""

from __future__ import annotations

import pytest
from shards import make_shards


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """512 train + 128 val samples of coloured shapes in 8+2 shards, with manifest.json."""
    root = tmp_path_factory.mktemp("train-shards")
    make_shards(str(root), 512, 64, image_size=48, seed=0, val_samples=128)
    return root
