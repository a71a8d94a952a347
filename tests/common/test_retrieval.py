"""Retrieval metrics in blocks equal the dense N x N computation, and stay small in memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from stages.common.retrieval import dense_retrieval_ranks, rank_metrics, retrieval_metrics, retrieval_ranks


def _features(n_images: int, captions: int, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    owner = torch.arange(n_images).repeat_interleave(captions)
    texts = F.normalize(images[owner] + 0.8 * torch.randn(len(owner), dim, generator=g), dim=-1)
    return images, texts, owner


@pytest.mark.parametrize("n, captions, block", [(1, 1, 4), (37, 1, 8), (100, 5, 16), (513, 2, 64)])
def test_blocks_equal_dense(n, captions, block):
    images, texts, owner = _features(n, captions, seed=n)
    blocked = retrieval_ranks(images, texts, owner, block=block)
    dense = dense_retrieval_ranks(images, texts, owner)
    assert torch.equal(blocked[0], dense[0]) and torch.equal(blocked[1], dense[1])
    dense_metrics = {**rank_metrics(dense[0], "text_retrieval"), **rank_metrics(dense[1], "image_retrieval")}
    assert retrieval_metrics(images, texts, owner, block=block) == dense_metrics


def test_one_caption_per_image_matches_open_clip_train():
    from open_clip_train.train import get_clip_metrics

    images, texts, owner = _features(200, 1, seed=3)
    ours = retrieval_metrics(images, texts, owner, i2t_name="image_to_text", t2i_name="text_to_image")
    theirs = get_clip_metrics(images, texts, torch.tensor(1.0))
    for name in ("image_to_text", "text_to_image"):
        assert ours[f"{name}_mean_rank"] == pytest.approx(float(theirs[f"{name}_mean_rank"]))
        assert ours[f"{name}_median_rank"] == pytest.approx(float(theirs[f"{name}_median_rank"]))
        for k in (1, 5, 10):
            assert ours[f"{name}_recall@{k}"] == pytest.approx(float(theirs[f"{name}_R@{k}"]))


@pytest.mark.slow
def test_50k_pairs_stay_under_the_memory_bound(tmp_path):
    # dense: 50k x 50k scores + masks ~ 13 bytes a pair = 32 GB; blocks of 1024: ~0.4 GB
    script = (
        "import resource, torch, torch.nn.functional as F\n"
        "from stages.common.retrieval import retrieval_metrics\n"
        "torch.manual_seed(0); n = 50_000\n"
        "img = F.normalize(torch.randn(n, 8), dim=-1); txt = F.normalize(img + torch.randn(n, 8), dim=-1)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = retrieval_metrics(img, txt, torch.arange(n))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(after - before, m['text_retrieval_recall@1'])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    grown_kib, r1 = out.stdout.split()
    assert int(grown_kib) < 1_000_000, f"peak RSS grew by {int(grown_kib) // 1024} MiB"  # bound: 1 GiB
    assert 0.0 < float(r1) < 1.0
