"""The train loader on real shards: local and on the real moto S3 server."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import open_clip
import pytest
import webdataset as wds
from shards import make_shards

from stages.common import shards as wds_shards
from stages.common.errors import DataError
from stages.common.models import register_builtin_configs
from stages.train import data

MODEL = "clipforge-micro"


@pytest.fixture(scope="module")
def transforms():
    register_builtin_configs()
    _, train_tf, val_tf = open_clip.create_model_and_transforms(MODEL)
    return train_tf, val_tf, open_clip.get_tokenizer(MODEL)


def cfg(train_data: str, **kw) -> SimpleNamespace:
    base = dict(train_data=train_data, train_data_upsampling_factors=None, val_data="auto",
                dataset_resampled=False, train_num_samples=None, batch_size=8, workers=2, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def digest(images) -> list[str]:
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images]


def epoch_batches(info: data.DataInfo) -> list[tuple]:
    return [(images.clone(), texts.clone()) for images, texts in info.loader]


def sample_ids(batches) -> list[str]:
    return [h for images, _ in batches for h in digest(images)]


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_shards(str(root), n_samples=96, samples_per_shard=12, image_size=64, seed=1, val_samples=20)
    return str(root)


def test_s3_and_local_shards_give_the_same_batches(s3, local_shards, transforms):
    train_tf, val_tf, tok = transforms
    make_shards(f"{s3}/run/data", n_samples=96, samples_per_shard=12, image_size=64, seed=1, val_samples=20)
    local = epoch_batches(data.get_train_data(cfg(local_shards), val_tf, tok, rank=0, world_size=1))
    remote_info = data.get_train_data(cfg(f"{s3}/run"), val_tf, tok, rank=0, world_size=1)
    remote = epoch_batches(remote_info)
    assert len(local) == len(remote) == remote_info.num_batches == 12
    for (li, lt), (ri, rt) in zip(local, remote, strict=True):
        assert li.shape == (8, 3, 32, 32) and lt.shape == (8, 16)
        assert (li == ri).all() and (lt == rt).all()
    # the opener is registered in webdataset itself, for anyone using it directly
    keys = [s["__key__"] for s in wds.WebDataset(f"{s3}/run/data/00000.tar", shardshuffle=False)]
    assert len(keys) == 12


def test_shuffle_is_deterministic_per_epoch(local_shards, transforms):
    train_tf, val_tf, tok = transforms
    first = data.get_train_data(cfg(local_shards), val_tf, tok, rank=0, world_size=1)
    again = data.get_train_data(cfg(local_shards), val_tf, tok, rank=0, world_size=1)
    epoch0 = sample_ids(epoch_batches(first))
    assert epoch0 == sample_ids(epoch_batches(again))
    first.set_epoch(1)
    epoch1 = sample_ids(epoch_batches(first))
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    later = data.get_train_data(cfg(local_shards), val_tf, tok, rank=0, world_size=1, epoch=1)
    assert sample_ids(epoch_batches(later)) == epoch1
    other_seed = data.get_train_data(cfg(local_shards, seed=7), val_tf, tok, rank=0, world_size=1)
    assert sample_ids(epoch_batches(other_seed)) != epoch0


def test_ranks_read_disjoint_shards_and_take_equal_steps(tmp_path, transforms):
    train_tf, val_tf, tok = transforms
    # 5 shards of 10,10,10,10,3 samples: one rank gets more data than the other
    make_shards(str(tmp_path), n_samples=43, samples_per_shard=10, image_size=64, seed=2)
    ranks = [data.get_train_data(cfg(str(tmp_path), batch_size=4, workers=2), val_tf, tok,
                                 rank=r, world_size=2) for r in range(2)]
    batches = [epoch_batches(info) for info in ranks]
    assert ranks[0].num_batches == ranks[1].num_batches == 6  # ceil(43 / (4 x 2))
    assert len(batches[0]) == len(batches[1]) == 6
    seen = [set(sample_ids(b)) for b in batches]
    assert not seen[0] & seen[1]


def test_truncated_shard_and_non_image_are_skipped_and_counted(tmp_path, transforms):
    train_tf, val_tf, tok = transforms
    make_shards(str(tmp_path), n_samples=40, samples_per_shard=10, image_size=64, seed=3,
                corrupt=True, val_samples=0)
    manifest = str(tmp_path / "manifest.json")
    # read every shard once: 40 written, 1 not an image, the cut shard keeps 5 of 10
    val = data.get_val_data(cfg(manifest, val_data=str(tmp_path / "{00000..00003}.tar"), batch_size=5),
                            val_tf, tok, rank=0, world_size=1)
    got = sum(len(images) for images, _ in val.loader)
    assert got == 34
    assert val.skipped_samples() == 2  # the non-image sample and the truncated shard
    train = data.get_train_data(cfg(manifest, batch_size=5), train_tf, tok, rank=0, world_size=1)
    for epoch in range(2):
        train.set_epoch(epoch)
        assert len(epoch_batches(train)) == train.num_batches == 8
    assert train.skipped_samples() >= 4  # each epoch passes both faults at least once


def _taken(info: data.DataInfo, n: int) -> list[tuple]:
    it = iter(info.loader)
    return [tuple(t.clone() for t in next(it)) for _ in range(n)]


def test_resume_continues_the_epoch_exactly_where_it_was(local_shards, transforms):
    train_tf, val_tf, tok = transforms
    c = cfg(local_shards, workers=2)
    everything = epoch_batches(data.get_train_data(c, val_tf, tok, rank=0, world_size=1))
    interrupted = data.get_train_data(c, val_tf, tok, rank=0, world_size=1)
    consumed = _taken(interrupted, 5)
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 5
    # plain values only: a weights_only torch.load reads it back
    import io

    import torch
    buf = io.BytesIO()
    torch.save({"data_state": {"world_size": 1, "ranks": [state]}}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["data_state"]
    resumed = data.get_train_data(c, val_tf, tok, rank=0, world_size=1)
    resumed.load_state_dict(saved)
    assert resumed.batches_left() == 7
    rest = epoch_batches(resumed)
    assert sample_ids(consumed) + sample_ids(rest) == sample_ids(everything)
    assert resumed.state_dict()["consumed"] == 12
    resumed.set_epoch(1)  # the next epoch is whole again
    assert len(epoch_batches(resumed)) == 12
    fresh = data.get_train_data(c, val_tf, tok, rank=0, world_size=1)
    fresh.load_state_dict({"world_size": 1, "ranks": []})  # an epoch-end checkpoint: from the start
    assert sample_ids(epoch_batches(fresh)) == sample_ids(everything)


@pytest.mark.parametrize("new_world, new_workers, new_batch", [(1, 3, 8), (3, 1, 4), (2, 2, 6)])
def test_resume_on_another_layout_neither_replays_nor_skips(local_shards, transforms, new_world,
                                                             new_workers, new_batch):
    train_tf, val_tf, tok = transforms
    old = [data.get_train_data(cfg(local_shards, workers=2, batch_size=4), val_tf, tok, rank=r, world_size=2)
           for r in range(2)]
    assert old[0].num_batches == 12  # 96 samples / (2 ranks x 4)
    consumed = [sample_ids(_taken(info, 5)) for info in old]
    saved = {"world_size": 2, "ranks": [info.state_dict() for info in old]}
    new = [data.get_train_data(cfg(local_shards, workers=new_workers, batch_size=new_batch), val_tf, tok,
                               rank=r, world_size=new_world) for r in range(new_world)]
    rest = []
    for info in new:
        info.load_state_dict(saved)
        left = info.batches_left()
        assert left == -(-56 // (new_world * new_batch))
        batches = epoch_batches(info)
        assert len(batches) == left
        rest += sample_ids(batches)
    seen = consumed[0] + consumed[1] + rest
    all_ids = sample_ids(epoch_batches(data.get_train_data(cfg(local_shards, workers=0), val_tf, tok,
                                                           rank=0, world_size=1)))
    assert len(rest) >= 96 - 40 and sorted(set(seen)) == sorted(all_ids)
    assert len(seen) - len(set(seen)) == len(rest) - (96 - 40)  # repeats only to fill the last batch


def test_resampled_sources_with_upsampling(tmp_path, transforms):
    train_tf, val_tf, tok = transforms
    make_shards(str(tmp_path / "a"), n_samples=24, samples_per_shard=6, image_size=64, seed=4)
    make_shards(str(tmp_path / "b"), n_samples=24, samples_per_shard=6, image_size=64, seed=5)
    spec = f"{tmp_path}/a::{tmp_path}/b/{{00000..00003}}.tar"
    assert [len(s) for s, _ in data.resolve_train_shards(spec, "1::3")] == [4, 4]
    c = cfg(spec, train_data_upsampling_factors="1::3", dataset_resampled=True, train_num_samples=64)
    info = data.get_train_data(c, val_tf, tok, rank=0, world_size=1)
    assert info.num_batches == 8 and len(epoch_batches(info)) == 8


def test_val_split_from_the_manifest(local_shards, transforms):
    train_tf, val_tf, tok = transforms
    val = data.get_val_data(cfg(local_shards), val_tf, tok, rank=0, world_size=1)
    assert sum(len(i) for i, _ in val.loader) == 20
    assert data.get_val_data(cfg(local_shards, val_data="none"), val_tf, tok, rank=0, world_size=1) is None


@pytest.mark.parametrize("spec, factors, message", [
    ("{root}/nowhere", None, "no manifest.json"),
    ("{root}/{{00000..00003}}.tar", None, "do not exist"),
    ("{root}/*.tgz", None, "matches no shards"),
    ("{root}::", None, "empty '::' source"),
    ("{root}::{root}", "1", "gives 1 factors for 2"),
    ("{root}::{root}", "1::x", "not numbers"),
    ("{root}", "-1", "must be positive"),
])
def test_bad_specs_are_clear_errors(tmp_path, spec, factors, message):
    make_shards(str(tmp_path), n_samples=6, samples_per_shard=3, image_size=32, seed=0)
    with pytest.raises(DataError, match=message):
        data.resolve_train_shards(spec.format(root=tmp_path), factors)


def test_a_manifest_without_train_shards_and_factors_without_resampling(tmp_path, transforms):
    train_tf, val_tf, tok = transforms
    make_shards(str(tmp_path / "v"), n_samples=0, samples_per_shard=3, image_size=32, seed=0, val_samples=3)
    with pytest.raises(DataError, match="lists no train shards"):
        data.resolve_train_shards(str(tmp_path / "v"), None)
    make_shards(str(tmp_path / "t"), n_samples=6, samples_per_shard=3, image_size=32, seed=0)
    with pytest.raises(DataError, match="needs --dataset-resampled"):
        data.get_train_data(cfg(str(tmp_path / "t"), train_data_upsampling_factors="2"), val_tf, tok,
                            rank=0, world_size=1)


def test_the_fast_decoder_matches_open_clips_transform(local_shards, transforms):
    import io
    import tarfile

    from PIL import Image

    train_tf, val_tf, tok = transforms
    with tarfile.open(f"{local_shards}/00000.tar") as tar:
        jpg = tar.extractfile(f"{tar.getnames()[0]}").read()
    decoder = data.ImageDecoder(val_tf)
    assert decoder.fast and decoder.draft_size == 32
    decoder.draft_size = 0  # without draft the result is open_clip's, to float rounding
    ours = decoder.collate([decoder.decode(jpg)])[0]
    theirs = val_tf(Image.open(io.BytesIO(jpg)))
    assert (ours - theirs).abs().max() < 1e-5


def _jpeg_bytes(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    import io
    import random

    from shards import draw_shape

    img = draw_shape("blue", "circle", max(width, height), random.Random(seed)).resize((width, height))
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def test_draft_decoding_never_goes_below_the_target_and_matches_the_transform():
    import io

    import torch
    import torchvision.transforms as T
    from PIL import Image

    train_tf = open_clip.image_transform(224, is_train=True)  # ViT-B-32's train transform
    decoder = data.ImageDecoder(train_tf)
    assert decoder.fast and decoder.draft_size == 224
    # draft keeps both sides >= 224 (a 512 px JPEG decodes at 256), never drafts a PNG
    for (w, h), expected in {(224, 224): (224, 224), (256, 256): (256, 256), (447, 447): (447, 447),
                             (448, 448): (224, 224), (512, 512): (256, 256), (1000, 300): (1000, 300),
                             (1000, 1000): (250, 250), (1800, 900): (450, 225)}.items():
        size = decoder.open(_jpeg_bytes(w, h, seed=w)).size
        assert size == expected and min(size) >= 224
    assert decoder.open(_jpeg_bytes(512, 512, seed=0, fmt="PNG")).size == (512, 512)
    # a center crop before any resize would see another part of a smaller image: no draft then
    assert data.ImageDecoder(open_clip.image_transform(224, is_train=False)).draft_size == 224
    norm = train_tf.transforms[-1]
    crop_first = T.Compose([T.CenterCrop(224), T.Resize(224), T.ToTensor(), T.Normalize(norm.mean, norm.std)])
    assert data.ImageDecoder(crop_first).fast and data.ImageDecoder(crop_first).draft_size == 0

    def both(jpgs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)  # the same random crops on both sides
        ours = decoder.collate([decoder.decode(j) for j in jpgs])
        torch.manual_seed(0)
        theirs = torch.stack([train_tf(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpgs])
        return ours, theirs

    # images that need no draft: the batch is open_clip's transform, to float rounding
    ours, theirs = both([_jpeg_bytes(s, s, seed=s + i) for i, s in enumerate((224, 256, 224, 256))])
    assert ours.shape == theirs.shape == (4, 3, 224, 224) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 1e-5
    # a 512 px JPEG decoded at 256 px: the same picture, resampled differently
    ours, theirs = both([_jpeg_bytes(512, 512, seed=3)])
    assert ours.shape == theirs.shape and (ours - theirs).abs().mean() < 0.05


def test_worker_batches_are_the_in_process_batches(local_shards, transforms):
    # a DataLoader worker writes batches straight into shared memory; the data must not change
    train_tf, val_tf, tok = transforms
    in_process = data.get_val_data(cfg(local_shards, workers=0), val_tf, tok, rank=0, world_size=1)
    worker = data.get_val_data(cfg(local_shards, workers=1), val_tf, tok, rank=0, world_size=1)
    ours, theirs = epoch_batches(in_process), epoch_batches(worker)
    assert sample_ids(ours) == sample_ids(theirs) and len(sample_ids(ours)) == 20
    assert all((a[1] == b[1]).all() for a, b in zip(ours, theirs, strict=True))


def test_worker_buffers_are_reused_only_when_the_trainer_let_go(local_shards, transforms):
    train_tf, val_tf, tok = transforms
    c = cfg(local_shards, workers=2)
    reference = sample_ids(epoch_batches(data.get_train_data(c, val_tf, tok, rank=0, world_size=1)))
    info = data.get_train_data(c, val_tf, tok, rank=0, world_size=1)
    pool = info.loader.dataset.pool
    slots = len(pool.flags)
    assert slots == 2 * (data.PREFETCH + 3) < 12
    # batches the trainer keeps are never written over: all 12 held at once stay as they came;
    # the workers filled all their slots, then made fresh tensors
    held, ids = [], []
    for images, _ in info.loader:
        held.append(images)
        ids += digest(images)
    assert ids == reference and sample_ids((h, None) for h in held) == reference
    assert pool.pooled == slots
    del held, images
    # leave iterations early a few times: the slots of the batches discarded come back
    for _ in range(4):
        next(iter(info.loader))
    # a trainer that drops each batch after its step gets every batch in a reused slot
    before = pool.pooled
    assert sample_ids(epoch_batches(info)) == reference
    assert pool.pooled - before == 12


def test_a_sample_stream_stopped_mid_shard_closes_quietly():
    import gc
    import sys

    members = [{"fname": f"{i:03d}.{ext}", "data": b"x"} for i in range(3) for ext in ("jpg", "txt")]
    stream = wds_shards._group(iter(members))
    assert next(stream)["__key__"] == "000"
    unraisable = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        stream.close()  # what an epoch that ends mid-shard does
        del stream
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == []

    def cut_off():  # a truncated shard: the whole samples before the break still come out
        yield from members[:4]
        raise OSError("truncated tar")

    got = []
    with pytest.raises(OSError):
        for sample in wds_shards._group(cut_off()):
            got.append(sample["__key__"])
    assert got == ["000", "001"]
