"""Every bad input fails with a clear error naming the file, before any result is written."""

from __future__ import annotations

import io
import os

import pytest
import torch
from evalkit import write_classification_set

from stages.common import storage
from stages.evaluate.cli import main


def _run(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.fixture
def good_set(tmp_path):
    uri = str(tmp_path / "colours")
    write_classification_set(uri, per_class=1, shards=1)
    return uri


def _evaluate(capsys, micro_run, eval_set) -> tuple[int, str]:
    rc, err = _run(capsys, "--checkpoint", micro_run, "--eval-data", eval_set, "--root",
                   os.path.dirname(micro_run), "--run-id", "r1", "--workers", "0")
    assert not storage.exists(f"{micro_run}/eval/results.json")
    return rc, err


@pytest.mark.parametrize("content", [None, "\n \n"])
def test_missing_or_empty_classnames(capsys, micro_run, good_set, content):
    path = f"{good_set}/classnames.txt"
    os.remove(path) if content is None else open(path, "w").write(content)
    rc, err = _evaluate(capsys, micro_run, good_set)
    assert rc == 3 and path in err and ("missing" if content is None else "empty") in err


def test_template_without_placeholder(capsys, micro_run, good_set):
    path = f"{good_set}/zeroshot_classification_templates.txt"
    open(path, "w").write("a photo of a {c}.\na photo of something.\n")
    rc, err = _evaluate(capsys, micro_run, good_set)
    assert rc == 3 and f"{path} line 2" in err and "{c}" in err


def test_label_outside_class_range(capsys, micro_run, tmp_path):
    eval_set = str(tmp_path / "shifted")
    write_classification_set(eval_set, per_class=1, shards=1, label_offset=1)  # labels 1..6 of 6 classes
    rc, err = _evaluate(capsys, micro_run, eval_set)
    assert rc == 3 and f"{eval_set}/test/0.tar" in err and "label 6, outside 0..5" in err


@pytest.mark.parametrize("nshards", [None, "3"])
def test_no_shards(capsys, micro_run, good_set, nshards):
    os.remove(f"{good_set}/test/0.tar")
    if nshards is None:
        os.remove(f"{good_set}/test/nshards.txt")
    else:
        open(f"{good_set}/test/nshards.txt", "w").write(nshards)
    rc, err = _evaluate(capsys, micro_run, good_set)
    assert rc == 3 and f"{good_set}/test" in err
    assert ("no shards" if nshards is None else "lacks ['0.tar', '1.tar', '2.tar']") in err


def _bad_checkpoint(tmp_path, content) -> str:
    path = tmp_path / "bad" / "step_1.pt"
    path.parent.mkdir()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        buf = io.BytesIO()
        torch.save(content, buf)
        path.write_bytes(buf.getvalue())
    return str(path)


@pytest.mark.parametrize("content,why", [
    (b"not a checkpoint at all", "not a loadable"),
    ([1, 2, 3], "a list"),
    ({"weights": {}}, "no 'model' or 'state_dict'"),
    ({"state_dict": {"w": torch.zeros(1)}, "epoch": 1}, "names no usable model"),
])
def test_not_a_clipforge_checkpoint(capsys, tmp_path, good_set, content, why):
    ckpt = _bad_checkpoint(tmp_path, content)
    rc, err = _run(capsys, "--checkpoint", ckpt, "--eval-data", good_set, "--root", str(tmp_path),
                   "--run-id", "r", "--workers", "0")
    assert rc == 3 and ckpt in err and why in err


def test_weights_that_do_not_fit_the_model(capsys, tmp_path, good_set, trained_micro):
    state = {k: v for k, v in trained_micro.state_dict().items() if not k.startswith("visual.")}
    ckpt = _bad_checkpoint(tmp_path, {"format": "clipforge.checkpoint/1", "model": state,
                                      "model_name": "clipforge-micro", "step": 1})
    rc, err = _run(capsys, "--checkpoint", ckpt, "--eval-data", good_set, "--root", str(tmp_path),
                   "--run-id", "r", "--workers", "0")
    assert rc == 3 and ckpt in err and "do not fit model 'clipforge-micro'" in err


def test_eval_sets_are_checked_before_the_model_is_loaded(capsys, tmp_path, good_set):
    os.remove(f"{good_set}/classnames.txt")
    missing_ckpt = str(tmp_path / "nowhere")
    rc, err = _run(capsys, "--checkpoint", missing_ckpt, "--eval-data", good_set, "--root", str(tmp_path),
                   "--run-id", "r")
    assert rc == 3 and "classnames.txt" in err and missing_ckpt not in err


def test_nothing_to_evaluate_is_a_config_error(capsys, tmp_path):
    rc, err = _run(capsys, "--root", str(tmp_path), "--run-id", "r")
    assert rc == 2 and "--eval-data" in err


def test_same_dataset_name_twice(capsys, tmp_path):
    rc, err = _run(capsys, "--root", str(tmp_path), "--run-id", "r", "--eval-data",
                   str(tmp_path / "a" / "colours"), str(tmp_path / "b" / "colours"))
    assert rc == 2 and "'colours'" in err and "NAME=URI" in err
