"""Each task type equals CLIP_benchmark's own computation on the same model and sets.

CLIP_benchmark reads the sets with its `build_dataset('wds/...')` and scores them with its
classifier and feature code (`zero_shot_classifier`, `run_classification`,
`average_precision_per_class`, `zeroshot_retrieval.evaluate`, `linear_probe.train`). Its
`zeroshot_classification.evaluate()` cannot run under numpy 2 (its `accuracy` turns a 1-element
array into a float), so top-1 is taken from its logits here, and mean per-class recall with
sklearn's balanced_accuracy_score exactly as its evaluate() does. Its linear probe's train()
moves the head with `.cuda()`; on a CPU-only machine the test makes `.cuda()` a no-op.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
from clip_benchmark.metrics import linear_probe as cb_probe
from clip_benchmark.metrics import zeroshot_classification as zsc
from clip_benchmark.metrics import zeroshot_retrieval as zsr
from evalkit import (
    save_checkpoint,
    untrained_micro,
    write_classification_set,
    write_multicaption_set,
    write_multilabel_set,
    write_probe_set,
)
from sklearn.metrics import balanced_accuracy_score

from stages.evaluate.cli import main

TOKENIZER = "clipforge-micro"


@pytest.fixture(scope="module")
def model_and_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cbparity")
    model = untrained_micro()
    save_checkpoint(model, str(tmp / "run"), step=3)
    _, _, preprocess = open_clip.create_model_and_transforms("clipforge-micro")
    return model, preprocess, tmp


def _ours(tmp, *flags: str) -> dict:
    out = tmp / f"results-{abs(hash(flags))}.json"
    assert main(["--checkpoint", str(tmp / "run"), "--root", str(tmp), "--run-id", "run", "--workers", "0",
                 "--batch-size", "5", "--output", str(out), *flags]) == 0
    return json.loads(out.read_text())["datasets"]


def _cb_dataset(root, preprocess, split="test", task="zeroshot_classification"):
    return build_dataset(dataset_name="wds/set", root=str(root), transform=preprocess, split=split,
                         download=False, task=task)


def _cb_logits(model, preprocess, root):
    ds = _cb_dataset(root, preprocess)
    tokenizer = open_clip.get_tokenizer(TOKENIZER)
    classifier = zsc.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    return zsc.run_classification(model, classifier, loader, "cpu", amp=False)


def test_zero_shot_classification_equals_clip_benchmark(model_and_run):
    model, preprocess, tmp = model_and_run
    write_classification_set(str(tmp / "colours"), per_class=5, shards=3)
    ours = _ours(tmp, "--eval-data", str(tmp / "colours"))["colours"]["metrics"]
    logits, target = _cb_logits(model, preprocess, tmp / "colours")
    pred = logits.argmax(dim=1)
    assert ours["acc1"] == pytest.approx((pred == target).float().mean().item(), abs=1e-6)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(target, pred), abs=1e-6)
    assert 0.0 < ours["acc1"] < 1.0


def test_multilabel_mean_average_precision_equals_clip_benchmark(model_and_run):
    model, preprocess, tmp = model_and_run
    write_multilabel_set(str(tmp / "pairs"))
    ours = _ours(tmp, "--eval-data", str(tmp / "pairs"))["pairs"]
    logits, target = _cb_logits(model, preprocess, tmp / "pairs")
    assert target.shape == (18, 6)  # CLIP_benchmark read the multi-hot .npy targets
    expected = zsc.average_precision_per_class(logits, target).mean().item()
    assert ours["task"] == "zeroshot_multilabel" and ours["samples"] == 18
    assert ours["metrics"]["mean_average_precision"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 < expected < 1.0


def test_retrieval_with_several_captions_equals_clip_benchmark(model_and_run):
    model, preprocess, tmp = model_and_run
    write_multicaption_set(str(tmp / "captions"))
    ours = _ours(tmp, "--eval-data", str(tmp / "captions"))["captions"]["metrics"]
    ds = _cb_dataset(tmp / "captions", preprocess, task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=image_captions_collate_fn)
    ref = zsr.evaluate(model, loader, open_clip.get_tokenizer(TOKENIZER), recall_k_list=[1, 5, 10],
                       device="cpu", amp=False)
    for k in (1, 5, 10):
        for kind in ("image_retrieval", "text_retrieval"):
            assert ours[f"{kind}_recall@{k}"] == pytest.approx(ref[f"{kind}_recall@{k}"], abs=1e-6)
    assert ours["mean_recall@1"] == pytest.approx(
        0.5 * (ref["image_retrieval_recall@1"] + ref["text_retrieval_recall@1"]), abs=1e-6)
    assert 0.0 < ref["image_retrieval_recall@5"] < 1.0


def test_linear_probe_equals_clip_benchmark(model_and_run, monkeypatch):
    model, preprocess, tmp = model_and_run
    write_probe_set(str(tmp / "probe"))
    ours = _ours(tmp, "--linear-probe-data", str(tmp / "probe"), "--fewshot-epochs", "4",
                 "--fewshot-lr", "0.05", "--seed", "3")["probe"]
    features = {}
    featurizer = cb_probe.Featurizer(model)
    for split in ("train", "test"):
        loader = torch.utils.data.DataLoader(_cb_dataset(tmp / "probe", preprocess, split), batch_size=5)
        with torch.no_grad():
            pairs = [(featurizer(x), y) for x, y in loader]
        features[split] = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    torch.manual_seed(3)
    train_x, train_y = features["train"]
    perm = torch.randperm(len(train_x)).tolist()  # CLIP_benchmark's fewshot_k=-1 selection
    train_loader = torch.utils.data.DataLoader(cb_probe.FeatureDataset(train_x[perm], train_y[perm]),
                                               batch_size=5, shuffle=True)
    head = cb_probe.train(train_loader, train_x.shape[1], int(train_y.max()) + 1, 0.0, 0.05, 4, False, "cpu", 3)
    test_x, test_y = features["test"]
    with torch.no_grad():
        pred = head(test_x).argmax(dim=1)
    assert ours["task"] == "linear_probe" and ours["samples"] == len(test_y)
    assert ours["metrics"]["acc1"] == pytest.approx((pred == test_y).float().mean().item(), abs=1e-6)
    assert ours["metrics"]["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(test_y, pred),
                                                                     abs=1e-6)
