"""WinoGAViL in the DataComp suite: read from <root>/hf_cache on any store, and its bad inputs.

Its parity with DataComp's scorer is in test_datacomp_suite.py; here the same cache is read from S3
(moto's real server on loopback), and broken caches fail clearly before the model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from evalkit import write_winogavil_cache

from stages.common import storage
from stages.evaluate.cli import main


def _suite(micro_run: str, root: str, out: str) -> int:
    return main(["--checkpoint", micro_run, "--root", os.path.dirname(micro_run), "--run-id", "r1",
                 "--workers", "0", "--output", out, "--suite", "datacomp", "--suite-root", root])


def _upload(local: str, uri: str) -> None:
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            storage.upload_file(path, storage.join(uri, os.path.relpath(path, local)))


def test_winogavil_from_an_s3_suite_root_equals_the_local_one(s3, micro_run, tmp_path):
    cache = str(tmp_path / "local" / "hf_cache")
    write_winogavil_cache(cache)
    local_out, s3_out = str(tmp_path / "local.json"), str(tmp_path / "s3.json")
    assert _suite(micro_run, str(tmp_path / "local"), local_out) == 0
    _upload(cache, f"{s3}/evalsets/hf_cache")
    shutil.rmtree(cache)  # the cache's image paths now resolve only under the S3 root's downloads/
    assert _suite(micro_run, f"{s3}/evalsets", s3_out) == 0
    local_doc, s3_doc = (json.loads(open(p).read()) for p in (local_out, s3_out))
    ours = s3_doc["datasets"]["misc/winogavil"]
    assert ours["uri"] == f"{s3}/evalsets/hf_cache" and ours["samples"] == 6
    assert ours["metrics"] == local_doc["datasets"]["misc/winogavil"]["metrics"]
    assert [r["task"] for r in s3_doc["suite"]["tasks"]] == ["misc/winogavil"]
    assert s3_doc["suite"]["average"] == ours["metrics"]["jaccard_score_10-12"]
    assert "misc/winogavil" not in {m["task"] for m in s3_doc["suite"]["missing"]}


def _listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_max_samples_scores_the_first_examples_and_nothing_is_written_to_the_root(micro_run, tmp_path):
    write_winogavil_cache(str(tmp_path / "evalsets" / "hf_cache"))
    before = _listing(tmp_path / "evalsets")
    out = str(tmp_path / "results.json")
    assert main(["--checkpoint", micro_run, "--root", os.path.dirname(micro_run), "--run-id", "r1",
                 "--workers", "0", "--output", out, "--suite", "datacomp", "--suite-root",
                 str(tmp_path / "evalsets"), "--max-samples", "3"]) == 0
    wino = json.loads(open(out).read())["datasets"]["misc/winogavil"]
    assert wino["samples"] == 3  # sizes 5, 6, 10: no 12-candidate example among them
    assert set(wino["metrics"]) == {"avg_jaccard_score", "jaccard_score_5", "jaccard_score_6", "jaccard_score_10",
                                    "jaccard_score_5-6", "jaccard_score_10-12"}
    assert _listing(tmp_path / "evalsets") == before  # no lock file: the root may be a read-only mount


def test_no_cache_is_listed_as_missing_with_the_expected_folder(micro_run, tmp_path):
    root = tmp_path / "evalsets"
    root.mkdir()
    out = str(tmp_path / "results.json")
    assert _suite(micro_run, str(root), out) == 0
    missing = {m["task"]: m for m in json.loads(open(out).read())["suite"]["missing"]}
    assert missing["misc/winogavil"]["expected"] == f"{root}/hf_cache/nlphuji___winogavil"


def _drop_associations(rows):
    for row in rows:
        del row["associations"]


def _stray_associations(rows):
    rows[2]["associations"] = ["not-a-candidate"]


def _empty_cue(rows):
    rows[4]["cue"] = " "


def _one_image_short(rows):
    rows[1]["candidate_images"] = rows[1]["candidate_images"][:-1]


@pytest.mark.parametrize("edit, message", [
    (_drop_associations, "lacks column(s) ['associations']"),
    (_stray_associations, "example 2 has no association among its candidates"),
    (_one_image_short, "example 1 has 5 images for 6 candidates"),
    (_empty_cue, "example(s) [4] have an empty cue"),
])
def test_a_broken_cache_fails_before_the_model_is_loaded(capsys, micro_run, tmp_path, edit, message,
                                                         monkeypatch):
    from stages.evaluate import runner

    write_winogavil_cache(str(tmp_path / "evalsets" / "hf_cache"), edit=edit)
    monkeypatch.setattr(runner, "load_model", lambda *a: pytest.fail("model loaded before the input check"))
    assert _suite(micro_run, str(tmp_path / "evalsets"), str(tmp_path / "r.json")) == 3
    err = capsys.readouterr().err
    assert f"{tmp_path}/evalsets/hf_cache/nlphuji___winogavil" in err and message in err
    assert not os.path.exists(tmp_path / "r.json")


def test_an_image_missing_from_the_cache_is_named_before_the_model_is_loaded(capsys, micro_run, tmp_path,
                                                                              monkeypatch):
    from stages.evaluate import runner

    rows = write_winogavil_cache(str(tmp_path / "evalsets" / "hf_cache"))
    lost = rows[3]["candidate_images"][4]
    os.remove(lost)
    monkeypatch.setattr(runner, "load_model", lambda *a: pytest.fail("model loaded before the input check"))
    assert _suite(micro_run, str(tmp_path / "evalsets"), str(tmp_path / "r.json")) == 3
    err = capsys.readouterr().err
    assert f"image {lost!r} is missing" in err
    assert not os.path.exists(tmp_path / "r.json")
