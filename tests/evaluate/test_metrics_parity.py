"""Our metrics equal open_clip's own zero-shot and retrieval code on the same model and data."""

from __future__ import annotations

import io

import open_clip
import pytest
import torch
from evalkit import (
    CLASSNAMES,
    TEMPLATES,
    save_checkpoint,
    untrained_micro,
    write_classification_set,
    write_retrieval_set,
)
from open_clip_train.train import get_clip_metrics
from PIL import Image

from stages.evaluate.cli import main


def _image_features(model, preprocess, encoded: list[bytes]) -> torch.Tensor:
    images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded])
    with torch.no_grad():
        return model.encode_image(images, normalize=True)


def _reference_classification(model, preprocess, items) -> dict[str, float]:
    """open_clip_train's zero_shot_eval path: build_zero_shot_classifier, 100 * f @ W, top-k."""
    tokenizer = open_clip.get_tokenizer("clipforge-micro")
    templates = [lambda c, t=t: t.replace("{c}", c) for t in TEMPLATES]
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSNAMES, templates,
                                                      num_classes_per_batch=4)
    logits = 100.0 * _image_features(model, preprocess, [b for b, _ in items]) @ classifier
    labels = torch.tensor([label for _, label in items])
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(labels.view(1, -1).expand_as(pred))
    per_class = [(pred[0][labels == c] == c).float().mean() for c in range(len(CLASSNAMES))]
    return {"acc1": correct[:1].float().sum().item() / len(labels),
            "acc5": correct[:5].float().sum().item() / len(labels),
            "mean_per_class_recall": torch.stack(per_class).mean().item()}


def _reference_retrieval(model, preprocess, items) -> dict[str, float]:
    tokenizer = open_clip.get_tokenizer("clipforge-micro")
    image_features = _image_features(model, preprocess, [b for b, _ in items])
    with torch.no_grad():
        text_features = model.encode_text(tokenizer([c for _, c in items]), normalize=True)
    ref = get_clip_metrics(image_features, text_features, model.logit_scale.exp())
    names = {"image_to_text": "text_retrieval", "text_to_image": "image_retrieval"}
    out = {}
    for seed_prefix, ours in names.items():
        for k in (1, 5, 10):
            out[f"{ours}_recall@{k}"] = float(ref[f"{seed_prefix}_R@{k}"])
        out[f"{ours}_mean_rank"] = float(ref[f"{seed_prefix}_mean_rank"])
        out[f"{ours}_median_rank"] = float(ref[f"{seed_prefix}_median_rank"])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_metrics_equal_open_clip_reference(tmp_path, workers):
    model = untrained_micro()
    run_dir = str(tmp_path / "run")
    save_checkpoint(model, run_dir, step=7)
    cls_items = write_classification_set(str(tmp_path / "sets" / "colours"), per_class=5, shards=3)
    ret_items = write_retrieval_set(str(tmp_path / "sets" / "captions"), per_class=4, shards=2)

    rc = main(["--root", str(tmp_path), "--run-id", "run", "--workers", str(workers), "--batch-size", "7",
               "--eval-data", str(tmp_path / "sets" / "colours"), str(tmp_path / "sets" / "captions")])
    assert rc == 0

    results = __import__("json").loads((tmp_path / "run" / "eval" / "results.json").read_text())
    _, _, preprocess = open_clip.create_model_and_transforms("clipforge-micro")
    colours, captions = results["datasets"]["colours"], results["datasets"]["captions"]
    assert colours["samples"] == len(cls_items) and captions["samples"] == len(ret_items)
    assert colours["checkpoint_step"] == 7 and colours["model"] == "clipforge-micro"
    assert colours["metrics"] == pytest.approx(_reference_classification(model, preprocess, cls_items),
                                               abs=1e-6)
    reference = _reference_retrieval(model, preprocess, ret_items)
    reference["mean_recall@1"] = 0.5 * (reference["text_retrieval_recall@1"] + reference["image_retrieval_recall@1"])
    assert captions["metrics"] == pytest.approx(reference, abs=1e-6)
    assert 0.0 < colours["metrics"]["acc1"] < 1.0  # the comparison is not between two trivial values
