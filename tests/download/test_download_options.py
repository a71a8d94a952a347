"""img2dataset's options through clipforge's flags: face blurring, filters, pass-through, wandb."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dlkit import checkerboard, read_manifest, run_download, tar_members
from PIL import Image

from stages.download.cli import main

BOX = [0.25, 0.25, 0.5, 0.5]  # x0, y0, x1, y1 as fractions: pixels 16..32 of the 64 px image


def test_face_box_is_blurred_inside_and_unchanged_outside(tmp_path, image_server, cli_env):
    base = image_server.base
    urls = tmp_path / "faces.parquet"
    pq.write_table(pa.table({"url": [f"{base}/face.png", f"{base}/img/1.png"],
                             "caption": ["a face", "too small"],
                             "face_bboxes": [[BOX], []]}), urls)
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {**cli_env, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    proc = run_download(["--url-list", str(urls), "--root", str(tmp_path / "runs"), "--run-id", "f",
                         "--bbox-col", "face_bboxes", "--resize-mode", "no", "--encode-format", "png", "--encode-quality", "9",
                         "--min-image-size", "48", "--compute-hash", "md5", "--allow-private-networks",
                         "--img2dataset-option", "downscale_interpolation=lanczos", "--enable-wandb",
                         "--wandb-project", "clipforge-test", "--threads", "2"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(str(tmp_path / "runs" / "f" / "data"))
    assert manifest["total_samples"] == 1 and manifest["failures_by_reason"] == {"filtered": 1}
    (sample,) = tar_members(open(manifest["shards"][0]["uri"], "rb").read()).values()
    meta = json.loads(sample["json"])
    assert meta["face_bboxes"] == [BOX] and len(meta["md5"]) == 32

    original = np.asarray(checkerboard(), dtype=np.int16)
    got = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.int16)
    inside = (slice(19, 30), slice(19, 30))
    assert got[inside].std() < original[inside].std() / 4, "the box must be blurred"
    outside = np.ones(original.shape[:2], bool)
    outside[8:41, 8:41] = False  # the box, img2dataset's 10% margin and the blur's soft edge
    assert np.array_equal(got[outside], original[outside]), "outside the box nothing may change"
    runs = list(wandb_dir.glob("wandb/offline-run-*"))
    assert runs, "--enable-wandb should start a (here offline) wandb run"


@pytest.mark.parametrize("argv,message", [
    (["--img2dataset-option", "thread_count=4"], "NAME one of"),
    (["--img2dataset-option", "subjob_size=many"], "subjob_size takes a int"),
    (["--img2dataset-option", "upscale_interpolation"], "expected NAME=VALUE"),
    (["--verify-hash", "sha", "--compute-hash", "none"], "--verify-hash needs --compute-hash"),
    (["--num-parts", "3"], "--num-parts 3 needs --part-index"),
    (["--num-parts", "3", "--part-index", "3"], "--part-index 3 is not in 0..2"),
    (["--max-response-bytes", "0"], "--max-response-bytes 0 must be at least 1"),
    (["--encode-format", "png"], "png takes --encode-quality 0-9"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, message):
    urls = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a"]}), urls)
    code = main(["--url-list", str(urls), "--root", str(tmp_path / "runs"), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_bbox_column_must_exist(tmp_path, capsys):
    urls = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a"]}), urls)
    code = main(["--url-list", str(urls), "--root", str(tmp_path / "runs"), "--bbox-col", "faces"])
    assert code == 3 and "no column 'faces' (--bbox-col)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
