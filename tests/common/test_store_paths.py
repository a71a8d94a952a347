"""Names read from a store stay inside their folder: object keys when copying a folder, model names."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import open_clip
import pytest

from stages.common import models, storage
from stages.common.errors import DataError


def _put(s3: str, key: str, body: bytes = b"x") -> None:
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=s3.removeprefix("s3://"), Key=key, Body=body)


def test_a_remote_folder_is_copied_with_its_layout(s3, tmp_path):
    _put(s3, "runs/r1/export/open_clip_config.json", b"{}")
    _put(s3, "runs/r1/export/sub/notes.txt", b"n")
    got = storage.download_folder(f"{s3}/runs/r1/export", str(tmp_path / "local"))
    assert sorted(Path(p).relative_to(tmp_path / "local").as_posix() for p in got) == [
        "open_clip_config.json", "sub/notes.txt"]
    assert (tmp_path / "local" / "sub" / "notes.txt").read_bytes() == b"n"


@pytest.mark.parametrize("key", ["runs/r1/export/../../../escaped.txt", "runs/r1/export/sub/../../../../escaped.txt"])
def test_keys_that_would_land_outside_the_target_are_refused_and_nothing_is_copied(s3, tmp_path, key):
    _put(s3, "runs/r1/export/open_clip_config.json", b"{}")
    _put(s3, key, b"evil")
    target = tmp_path / "a" / "b" / "local"
    with pytest.raises(DataError, match=r"would be written outside"):
        storage.download_folder(f"{s3}/runs/r1/export", str(target))
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not target.exists() or not any(target.iterdir())  # refused before any copy


@pytest.mark.parametrize("relative", ["../x", "/etc/passwd", "a/../../x", ""])
def test_child_path_refuses_names_outside_the_folder(tmp_path, relative):
    with pytest.raises(DataError, match="outside"):
        storage.child_path(str(tmp_path), relative, "s3://b/k")


@pytest.mark.parametrize("name", ["../../../tmp/evil", "a/b", "..", ".hidden", "x" * 200, "name with space", ""])
def test_model_names_from_a_checkpoint_are_checked_before_they_become_file_names(name):
    cfg = models.model_config("clipforge-micro")
    with pytest.raises(DataError, match="is not a valid model name") as info:
        models.register_config(name, cfg, source="s3://b/runs/r1/checkpoints/step_8.pt")
    assert "s3://b/runs/r1/checkpoints/step_8.pt" in str(info.value)


def test_valid_model_names_register(tmp_path):
    models.register_config("my-model_v1.2+cf", models.model_config("clipforge-micro"), source="s3://b/c.pt")
    assert "my-model_v1.2+cf" in open_clip.list_models()


def _export_to(s3: str, tmp_path) -> str:
    """A real export (the export stage's output) of a micro model, uploaded to the store."""
    from stages.export import weights

    models.register_builtin_configs()
    model = open_clip.create_model("clipforge-micro")
    ckpt = {"model_name": "clipforge-micro", "step": 3, "uri": f"{s3}/runs/r1/checkpoints/step_3.pt"}
    folder = tmp_path / "export"
    folder.mkdir()
    weights.write_layout(str(folder), model, models.model_config("clipforge-micro"), ckpt, "fp32")
    for path in folder.iterdir():
        storage.upload_file(str(path), f"{s3}/runs/r1/export/{path.name}")
    return f"{s3}/runs/r1/export"


def test_evaluate_loads_a_remote_export_and_refuses_one_with_an_escaping_key(s3, tmp_path):
    import torch

    from stages.evaluate.model import load_model

    export = _export_to(s3, tmp_path)
    loaded = load_model(export, torch.device("cpu"))
    assert loaded.step == 3
    _put(s3, "runs/r1/export/../../../../../../tmp/clipforge-escaped.txt", b"evil")
    with pytest.raises(DataError, match="would be written outside"):
        load_model(export, torch.device("cpu"))
    assert not os.path.exists("/tmp/clipforge-escaped.txt")
