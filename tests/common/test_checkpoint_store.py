"""The checkpoint contract: verified reads through LATEST, fallback, safe pruning, whole-or-nothing writes."""

from __future__ import annotations

import json

import pytest
import torch

from stages.common import checkpoints, storage
from stages.common.errors import DataError, StorageError


def _save(ckpt_dir: str, steps) -> None:
    for step in steps:
        checkpoints.save(ckpt_dir, step, {"model": {"w": torch.full((64,), float(step))},
                                          "model_name": "clipforge-micro"})


def _flip_a_byte(uri: str) -> None:
    data = bytearray(storage.read_bytes(uri))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(uri, bytes(data))


@pytest.fixture(params=["local", "s3"])
def ckpt_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    return request.getfixturevalue("s3") + "/run/checkpoints"


def test_latest_keeps_a_history_and_the_file_is_plain_torch(ckpt_dir, tmp_path):
    _save(ckpt_dir, [2, 4, 6, 8, 10])
    pointer = checkpoints.read_latest(ckpt_dir)
    assert pointer["step"] == 10 and [e["step"] for e in pointer["history"]] == [8, 6, 4]
    local = tmp_path / "copy.pt"
    storage.download_file(pointer["uri"], str(local))
    raw = torch.load(local, weights_only=True)  # what any reader without clipforge can do
    assert raw["format"] == checkpoints.FORMAT and raw["model"]["w"][0] == 10.0


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint(ckpt_dir):
    _save(ckpt_dir, [2, 4, 6])
    _flip_a_byte(checkpoints.checkpoint_uri(ckpt_dir, 6))
    ckpt = checkpoints.read(ckpt_dir)
    assert ckpt.step == 4 and ckpt.model["w"][0] == 4.0
    assert [(u.rsplit("/", 1)[-1], "sha256 does not match" in why) for u, why in ckpt.fallbacks] == \
        [("step_6.pt", True)]


def test_a_missing_target_and_a_corrupt_one_fall_back_two_steps(ckpt_dir):
    _save(ckpt_dir, [2, 4, 6])
    storage.delete(checkpoints.checkpoint_uri(ckpt_dir, 6))
    _flip_a_byte(checkpoints.checkpoint_uri(ckpt_dir, 4))
    ckpt = checkpoints.read(ckpt_dir)
    assert ckpt.step == 2 and len(ckpt.fallbacks) == 2
    assert "no such checkpoint" in ckpt.fallbacks[0][1]


def test_nothing_that_verifies_is_a_clear_error(tmp_path):
    ckpt_dir = str(tmp_path / "c")
    _save(ckpt_dir, [2, 4])
    for step in (2, 4):
        _flip_a_byte(checkpoints.checkpoint_uri(ckpt_dir, step))
    with pytest.raises(DataError, match=r"no checkpoint it names verifies: .*step_4\.pt: .*step_2\.pt"):
        checkpoints.read(ckpt_dir)


def test_a_file_named_directly_is_verified_against_latest(tmp_path):
    ckpt_dir = str(tmp_path / "c")
    _save(ckpt_dir, [2, 4])
    _flip_a_byte(checkpoints.checkpoint_uri(ckpt_dir, 2))
    with pytest.raises(DataError, match="sha256 does not match"):
        checkpoints.read(checkpoints.checkpoint_uri(ckpt_dir, 2))


def test_prune_keeps_the_newest_and_spares_latest_and_its_fallback(tmp_path):
    ckpt_dir = str(tmp_path / "c")
    _save(ckpt_dir, [1, 2, 3, 4, 5])
    deleted, failures = checkpoints.prune(ckpt_dir, keep_last=3)
    assert failures == [] and [s for s, _ in checkpoints.list_checkpoints(ckpt_dir)] == [3, 4, 5]
    assert len(deleted) == 2
    deleted, failures = checkpoints.prune(ckpt_dir, keep_last=1)  # 1 asked; 2 kept for the fallback
    assert [s for s, _ in checkpoints.list_checkpoints(ckpt_dir)] == [4, 5]
    storage.delete(checkpoints.checkpoint_uri(ckpt_dir, 5))
    assert checkpoints.read(ckpt_dir).step == 4


def test_a_write_that_fails_midway_leaves_nothing(ckpt_dir):
    uri = checkpoints.checkpoint_uri(ckpt_dir, 7)

    def half_then_fail(stream) -> None:
        stream.write(b"x" * (6 * 2**20))
        raise RuntimeError("disk on fire")

    with pytest.raises(StorageError, match="disk on fire"):
        checkpoints.write_stream(uri, half_then_fail)
    assert not storage.exists(uri)
    assert [u for u in storage.listdir(ckpt_dir) if ".tmp-" in u] == []


def test_latest_names_only_what_was_completely_written(tmp_path):
    ckpt_dir = str(tmp_path / "c")
    _save(ckpt_dir, [3])
    with pytest.raises(StorageError, match="killed"):
        checkpoints.write_stream(checkpoints.checkpoint_uri(ckpt_dir, 6),
                                 lambda s: (_ for _ in ()).throw(RuntimeError("killed")))
    assert json.loads((tmp_path / "c" / "LATEST").read_text())["step"] == 3


def test_open_clip_train_and_format_1_checkpoints_are_read(tmp_path):
    w = {"w": torch.ones(3)}
    # open_clip_train's layout: {logs}/{name}/checkpoints/epoch_N.pt, the model named in {name}/params.txt
    (tmp_path / "oc" / "checkpoints").mkdir(parents=True)
    (tmp_path / "oc" / "params.txt").write_text("batch_size: 8\nmodel: ViT-B-32\nname: oc\n")
    torch.save({"epoch": 2, "name": "oc", "state_dict": {"module.w": w["w"]}}, tmp_path / "oc/checkpoints/epoch_2.pt")
    oc = checkpoints.read(str(tmp_path / "oc/checkpoints/epoch_2.pt"))
    assert (oc.format, oc.epoch, oc.model_name, list(oc.model)) == ("open_clip_train", 2, "ViT-B-32", ["w"])
    torch.save({"format": checkpoints.FORMAT_V1, "step": 5, "epoch": 0, "model": w, "optimizer": {},
                "rng": {"torch": torch.get_rng_state()}, "data_state": {"epoch": 0, "batches": 5}},
               tmp_path / "v1.pt")
    v1 = checkpoints.read(str(tmp_path / "v1.pt"))
    assert v1.trainer["progress"]["step"] == 5
    assert v1.trainer["data"]["ranks"] == [{"epoch": 0, "batches": 5}] and len(v1.trainer["rng"]["ranks"]) == 1
