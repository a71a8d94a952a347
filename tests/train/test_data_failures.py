"""Data that cannot train fails loudly and early, naming what the samples hold and how to point at it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import open_clip
import pytest
from shards import make_shards
from trainrun import FAST, train_env

from stages.common import storage
from stages.common.errors import DataError
from stages.common.models import register_builtin_configs
from stages.train import data


def _rewrite(src: str, dst: str, rename: dict[str, str | None], broken_image: bool = False) -> None:
    """Copy shards and the manifest, renaming members by suffix (None drops them)."""
    storage.makedirs(dst)
    manifest = storage.read_json(f"{src}/manifest.json")
    for shard in manifest["shards"]:
        name = shard["uri"].rsplit("/", 1)[-1]
        out = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard["uri"]))) as tin, \
                tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tout:
            for member in tin.getmembers():
                key, ext = member.name.split(".", 1)
                ext = rename.get(ext, ext)
                if ext is None:
                    continue
                payload = tin.extractfile(member).read()
                if broken_image and ext == "jpg":
                    payload = b"\xff\xd8 not really a jpeg"
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tout.addfile(info, io.BytesIO(payload))
        storage.write_bytes(f"{dst}/{name}", out.getvalue())
        shard["uri"] = f"{dst}/{name}"
    for split in manifest["splits"].values():
        split["shards"] = [f"{dst}/{u.rsplit('/', 1)[-1]}" for u in split["shards"]]
    storage.write_json(f"{dst}/manifest.json", manifest)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("good"))
    make_shards(root, n_samples=64, samples_per_shard=16, image_size=32, seed=5)
    return root


def _train(shards: str, tmp_path, cli_env, *extra: str) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "stages.train", *FAST, "--train-data", shards, "--root", str(tmp_path),
           "--run-id", "r", "--steps", "2", "--save-every-steps", "0", *extra]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=train_env(cli_env), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr + proc.stdout, time.monotonic() - started


@pytest.mark.parametrize("rename, broken, expected", [
    ({"txt": "caption"}, False, ["no_caption_key", ".caption", "--caption-key caption"]),
    ({"txt": None}, False, ["no_caption_key", ".json", "--caption-key json:caption"]),
    ({}, True, ["undecodable_image", ".jpg"]),
])
def test_unusable_shards_fail_in_seconds_naming_the_keys(good, tmp_path, cli_env, rename, broken, expected):
    bad = str(tmp_path / "bad")
    _rewrite(good, bad, rename, broken_image=broken)
    rc, out, seconds = _train(bad, tmp_path, cli_env)
    assert rc == 3, out
    assert "none of the first 16 samples has a usable image" in out and "Traceback" not in out
    for text in expected:
        assert text in out
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert seconds < 60  # the job fails before any model is built, not at its deadline


def test_json_caption_key_trains(good, tmp_path, cli_env):
    only_json = str(tmp_path / "json")
    _rewrite(good, only_json, {"txt": None})
    rc, out, _ = _train(only_json, tmp_path, cli_env, "--caption-key", "json:caption")
    assert rc == 0, out
    assert "Step: 2/2" in out


def _cfg(train_data: str, **kw) -> SimpleNamespace:
    base = dict(train_data=train_data, train_data_upsampling_factors=None, val_data="none",
                dataset_resampled=False, train_num_samples=None, batch_size=4, workers=2, seed=0,
                max_unusable_samples=20)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def transforms():
    register_builtin_configs()
    _, _, val_tf = open_clip.create_model_and_transforms("clipforge-micro")
    return val_tf, open_clip.get_tokenizer("clipforge-micro")


def test_a_worker_that_meets_only_unusable_samples_stops_with_the_reasons(good, tmp_path, transforms):
    # past the probe, mid-epoch: every sample after the first shard lost its caption
    mixed = str(tmp_path / "mixed")
    _rewrite(good, mixed, {"txt": "caption"})
    manifest = storage.read_json(f"{mixed}/manifest.json")
    first = manifest["shards"][0]["uri"]
    storage.copy(f"{good}/{first.rsplit('/', 1)[-1]}", first)
    # (the shuffle mixes the good shard in: a short run of unusable samples is what the worker meets)
    info = data.get_train_data(_cfg(mixed, workers=1, max_unusable_samples=4), *transforms, rank=0, world_size=1)
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        for _ in info.loader:
            pass
    message = str(caught.value)
    assert "4 samples in a row gave no usable one" in message
    assert "no_caption_key" in message and "mixed/0000" in message and "--caption-key caption" in message
    assert time.monotonic() - started < 30


def test_a_whole_pass_without_a_usable_sample_stops_instead_of_spinning(good, tmp_path, transforms):
    bad = str(tmp_path / "bad")
    _rewrite(good, bad, {"txt": "caption"})
    info = data.get_train_data(_cfg(bad, max_unusable_samples=10_000), *transforms, rank=0, world_size=1)
    with pytest.raises(DataError, match="a whole pass over its shards gave no usable sample"):
        next(iter(info.loader))


def test_images_above_the_pixel_limit_are_skipped_undecoded(good, tmp_path, transforms):
    info = data.get_train_data(_cfg(good, max_image_pixels=32 * 32 - 1, max_unusable_samples=5), *transforms,
                               rank=0, world_size=1)
    with pytest.raises(DataError, match="too_many_pixels 5"):
        next(iter(info.loader))
    fits = data.get_train_data(_cfg(good, max_image_pixels=32 * 32), *transforms, rank=0, world_size=1)
    assert len(list(fits.loader)) == fits.num_batches == 16


def test_bad_key_flags_are_config_errors():
    from stages.common.errors import ConfigError
    from stages.common.shards import SampleKeys

    for image, caption in (("jpg.x", "txt"), ("jpg", "yaml:caption"), ("jpg", "json:")):
        with pytest.raises(ConfigError):
            SampleKeys.from_flags(image, caption)


def test_a_stuck_worker_surfaces_through_the_data_timeout(tmp_path, transforms):
    fifo = tmp_path / "stuck" / "00000.tar"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # opening it blocks until someone writes: a store that never answers
    info = data.get_train_data(_cfg(str(fifo), workers=1, train_num_samples=8, data_timeout=2), *transforms,
                               rank=0, world_size=1)
    try:
        with pytest.raises(DataError, match=r"no batch from the data workers in 2s \(--data-timeout\)"):
            next(iter(info.loader))
    finally:
        with open(fifo, "wb"):  # let the worker go
            pass
