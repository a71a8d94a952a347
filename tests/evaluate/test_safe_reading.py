"""Eval sets are data, not code: members that other readers would unpickle are never decoded."""

from __future__ import annotations

import os
import pickle

from evalkit import encode, square, tar_bytes

from stages.common import storage
from stages.evaluate.cli import main


class _WritesMarker:
    """Unpickling this calls open(marker, 'w'): what a crafted .pyd member would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _retrieval_set_with_payload(uri: str, marker: str, n: int = 12) -> None:
    storage.write_text(storage.join(uri, "dataset_type.txt"), "retrieval\n")
    payload = pickle.dumps(_WritesMarker(marker))
    samples = []
    for i, colour in enumerate(["red", "green", "blue", "yellow", "white", "black"] * (n // 6)):
        sample = {"__key__": f"r{i:05d}", "png": encode(square(colour, 70 + i), "png"),
                  "txt": f"a {colour} square number {i}"}
        if i == 3:
            sample["pyd"] = payload
            sample["pth"] = payload
        samples.append(sample)
    storage.write_bytes(storage.join(uri, "test", "0.tar"), tar_bytes(samples))
    storage.write_text(storage.join(uri, "test", "nshards.txt"), "1\n")


def test_a_pickle_member_is_never_unpickled_and_counted_as_ignored(micro_run, tmp_path, s3):
    marker = str(tmp_path / "pwned")
    eval_set = f"{s3}/evalsets/crafted"
    _retrieval_set_with_payload(eval_set, marker)
    out = str(tmp_path / "results.json")
    assert main(["--checkpoint", micro_run, "--eval-data", f"crafted={eval_set}", "--root", str(tmp_path),
                 "--run-id", "r", "--workers", "1", "--output", out]) == 0
    assert not os.path.exists(marker)
    result = storage.read_json(out)["datasets"]["crafted"]
    assert result["samples"] == 12
    assert result["ignored_members"] == {"pth": 1, "pyd": 1}


def test_max_samples_caps_each_eval_set(micro_run, tmp_path):
    eval_set = str(tmp_path / "crafted")
    _retrieval_set_with_payload(eval_set, str(tmp_path / "marker"), n=24)
    out = str(tmp_path / "results.json")
    assert main(["--checkpoint", micro_run, "--eval-data", eval_set, "--root", str(tmp_path), "--run-id", "r",
                 "--workers", "0", "--max-samples", "10", "--output", out]) == 0
    assert storage.read_json(out)["datasets"]["crafted"]["samples"] == 10


def test_an_eval_set_without_captions_fails_before_the_model(tmp_path, capsys):
    eval_set = str(tmp_path / "nocaps")
    storage.write_text(storage.join(eval_set, "dataset_type.txt"), "retrieval\n")
    samples = [{"__key__": f"r{i}", "png": encode(square("red", i), "png"), "caption": "a red square"}
               for i in range(4)]
    storage.write_bytes(storage.join(eval_set, "test", "0.tar"), tar_bytes(samples))
    rc = main(["--checkpoint", str(tmp_path / "no-such-model"), "--eval-data", eval_set, "--root", str(tmp_path),
               "--run-id", "r"])
    err = capsys.readouterr().err
    assert rc == 3 and "none of the first 4 samples" in err and ".caption" in err and "no-such-model" not in err
