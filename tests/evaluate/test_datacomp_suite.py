"""`clipforge evaluate --suite datacomp`: DataComp's task list on a root of sets in CLIP_benchmark's
wds layout, with its main metrics, its WILDS/fairness subgroup metrics, missing sets listed, and its
average.

The subgroup reference is DataComp's own evaluator code (eval_utils/wilds_eval.py and
fairness_eval.py) on the `wilds` package's metrics, with DataComp's replacement for wilds'
torch_scatter group average; predictions come from CLIP_benchmark's classifier code. WinoGAViL's
reference is DataComp's eval_utils/wino_eval.py loop, reading the same Hugging Face datasets cache
with `datasets.load_dataset` offline, as DataComp does.
"""

from __future__ import annotations

import io
import json

import open_clip
import pytest
import torch
import wilds.common.metrics.metric as wilds_metric
import wilds.common.utils as wilds_utils
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification as zsc
from evalkit import (
    save_checkpoint,
    untrained_micro,
    write_classification_set,
    write_face_set,
    write_grouped_set,
    write_retrieval_set,
    write_winogavil_cache,
)
from wilds.common.grouper import CombinatorialGrouper
from wilds.common.metrics.all_metrics import F1, Accuracy, Recall
from wilds.datasets.wilds_dataset import WILDSDataset

from stages.evaluate import suite
from stages.evaluate.cli import main

GROUPED = {  # DataComp folder name: (task key, number of .npy fields)
    "wds_wilds-camelyon17_test": ("wilds/camelyon17", 3),
    "wds_wilds-fmow_test": ("wilds/fmow", 3),
    "wds_wilds-iwildcam_test": ("wilds/iwildcam", 9),
    "wds_dollar_street_test": ("fairness/dollar_street", 3),
    "wds_geode_test": ("fairness/geode", 2),
}


FACES = ("fairface", "utkface")


def _avg_over_groups(v, g, n_groups):  # DataComp's stand-in for wilds' torch_scatter version
    count = wilds_utils.get_counts(g, n_groups)
    avgs = torch.zeros(n_groups, dtype=torch.float, device=v.device).scatter_(0, index=g, src=v, reduce="add")
    return avgs / count, count


class _Evaluator(WILDSDataset):
    def __init__(self, metadata, fields):
        self._metadata_array, self._metadata_fields = metadata, fields


def _datacomp_reference(task: str, logits, target, metadata) -> dict:
    """DataComp's evaluators (wilds_eval.py / fairness_eval.py), condensed to the ones tested."""
    pred = logits.argmax(dim=1)
    fields = {"wilds/camelyon17": ["hospital", "slide", "y"], "wilds/fmow": ["region", "year", "y"],
              "wilds/iwildcam": ["location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"],
              "fairness/dollar_street": ["income_ds", "income_meta", "region"],
              "fairness/geode": ["region", "country"]}[task]
    ev = _Evaluator(metadata, fields)
    if task == "wilds/iwildcam":
        out = {}
        for metric in (Accuracy(), Recall(average="macro"), F1(average="macro")):
            out.update(metric.compute(pred, target))
        return out
    if task == "wilds/fmow":
        metric = Accuracy()
        out, _ = ev.standard_group_eval(metric, CombinatorialGrouper(ev, ["year"]), pred, target, metadata)
        out["acc_worst_year"] = out.pop("acc_wg")
        region = CombinatorialGrouper(ev, ["region"])
        res = metric.compute_group_wise(pred, target, region.metadata_to_group(metadata), region.n_groups)
        worst = [res[metric.group_metric_field(g)] for g in range(region.n_groups)
                 if res[metric.group_count_field(g)] > 0]
        for g in range(region.n_groups):
            out[f"acc_{region.group_field_str(g)}"] = res[metric.group_metric_field(g)]
            out[f"count_{region.group_field_str(g)}"] = res[metric.group_count_field(g)]
        out["acc_worst_region"] = min(worst)
        return out
    if task == "fairness/dollar_street":
        class TopK(Accuracy):
            def _compute_element_wise(self, y_pred, y_true):
                return (y_pred == y_true.unsqueeze(-1)).any(-1).float()
        top5 = logits.topk(5, dim=1).indices
        return ev.standard_group_eval(TopK(name="acc_top5"), CombinatorialGrouper(ev, ["income_ds"]),
                                      top5, target, metadata)[0]
    by = {"wilds/camelyon17": "slide", "fairness/geode": "region"}[task]
    return ev.standard_group_eval(Accuracy(), CombinatorialGrouper(ev, [by]), pred, target, metadata)[0]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datacomp")
    model = untrained_micro(seed=4)
    save_checkpoint(model, str(tmp / "run"), step=5)
    root = tmp / "evalsets"
    write_classification_set(str(root / "wds_cifar10_test"), per_class=3, shards=2)
    write_classification_set(str(root / "wds_vtab-pets_test"), per_class=3, shards=1)
    write_retrieval_set(str(root / "wds_retrieval-flickr_1k_test_image_text_retrieval_test"), per_class=2)
    sets = {folder: write_grouped_set(str(root / folder), fields, seed=len(folder))
            for folder, (_, fields) in GROUPED.items()}
    write_winogavil_cache(str(root / "hf_cache"))
    for kind in FACES:
        sets[kind] = write_face_set(str(root / f"wds_{kind}_test"), kind, seed=len(kind))
    out = tmp / "results.json"
    assert main(["--checkpoint", str(tmp / "run"), "--root", str(tmp), "--run-id", "run", "--workers", "0",
                 "--batch-size", "8", "--output", str(out), "--suite", "datacomp",
                 "--suite-root", str(root)]) == 0
    return model, tmp, sets, json.loads(out.read_text())


def test_suite_lists_every_task_that_did_not_run(suite_run):
    _, _, _, doc = suite_run
    summary = doc["suite"]
    ran = {row["task"] for row in summary["tasks"]}
    assert ran == {"cifar10", "vtab/pets", "retrieval/flickr_1k_test_image_text_retrieval", "misc/winogavil",
                   "fairness/fairface", "fairness/utkface", *[key for key, _ in GROUPED.values()]}
    missing = {m["task"]: m for m in summary["missing"]}
    assert len(ran) + len(missing) == len(suite.DATACOMP_TASKS) == 40
    assert missing["imagenet1k"]["reason"] == "not found"
    assert missing["imagenet1k"]["expected"].endswith("evalsets/wds_imagenet1k_test")
    assert summary["complete"] is False


def test_suite_average_is_datacomps_mean_of_main_metrics(suite_run):
    _, _, _, doc = suite_run
    rows = {row["task"]: row for row in doc["suite"]["tasks"]}
    datasets = doc["datasets"]
    assert rows["vtab/pets"]["main_metric"] == "mean_per_class_recall"
    assert rows["retrieval/flickr_1k_test_image_text_retrieval"]["value"] == pytest.approx(
        0.5 * (datasets["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]["text_retrieval_recall@1"]
               + datasets["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]["image_retrieval_recall@1"]))
    expected_main = {"cifar10": "acc1", "wilds/camelyon17": "acc1", "wilds/fmow": "acc_worst_region",
                     "wilds/iwildcam": "F1-macro_all", "fairness/dollar_street": "acc_top5_wg",
                     "fairness/geode": "acc_wg", "misc/winogavil": "jaccard_score_10-12"}
    for task, metric in expected_main.items():
        assert rows[task]["main_metric"] == metric
        assert rows[task]["value"] == datasets[task]["metrics"][metric]
    for task in ("fairness/fairface", "fairness/utkface"):  # DataComp gives them no main metric
        assert rows.pop(task)["main_metric"] is None
    values = [row["value"] for row in rows.values()]
    assert doc["suite"]["average"] == pytest.approx(sum(values) / len(values))
    assert doc["suite"]["averaged_tasks"] == len(rows) == 9


def test_suite_average_is_a_metric_with_the_suite_as_dataset(suite_run):
    from stages.evaluate.report import EvalMetrics

    _, _, _, doc = suite_run
    metrics = EvalMetrics("suite-test")
    metrics.record(doc)
    value = metrics.stage.registry.get_sample_value(
        "clipforge_evaluate_metric", {"run_id": "suite-test", "dataset": "datacomp", "metric": "average"})
    assert value == pytest.approx(doc["suite"]["average"])
    assert metrics.stage.registry.get_sample_value(
        "clipforge_evaluate_metric", {"run_id": "suite-test", "dataset": "wilds/fmow",
                                      "metric": "acc_worst_region"}) == doc["datasets"]["wilds/fmow"]["metrics"]["acc_worst_region"]


@pytest.mark.parametrize("folder", sorted(GROUPED))
def test_subgroup_metrics_equal_datacomps_evaluators(suite_run, folder, monkeypatch):
    model, tmp, sets, doc = suite_run
    task, _ = GROUPED[folder]
    monkeypatch.setattr(wilds_utils, "avg_over_groups", _avg_over_groups)
    monkeypatch.setattr(wilds_metric, "avg_over_groups", _avg_over_groups)
    _, _, preprocess = open_clip.create_model_and_transforms("clipforge-micro")
    ds = build_dataset(dataset_name=f"wds/{task}", root=str(tmp / "evalsets" / folder), transform=preprocess,
                       split="test", download=False)
    classifier = zsc.zero_shot_classifier(model, open_clip.get_tokenizer("clipforge-micro"), ds.classes,
                                          ds.templates, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, torch.utils.data.DataLoader(ds, batch_size=8),
                                            "cpu", amp=False)
    metadata = torch.tensor([meta for _, _, meta in sets[folder]])
    reference = _datacomp_reference(task, logits, target, metadata)
    ours = doc["datasets"][task]["metrics"]
    empty = [k.removeprefix("count_") for k, v in reference.items() if k.startswith("count_") and v == 0]
    for key, value in reference.items():
        if any(key.endswith("_" + label) for label in empty):
            assert key not in ours  # groups no sample falls in are not listed
            continue
        assert ours[key] == pytest.approx(float(value), abs=1e-6), key
    assert any(k.startswith("count_") for k in ours) or task == "wilds/iwildcam"


def _datacomp_winogavil(model, preprocess, tokenizer, cache_dir: str, monkeypatch) -> dict:
    """DataComp's evaluate_winogavil_dataset (eval_utils/wino_eval.py) on the CPU: its load_dataset
    call (offline, so only the cache is read), its WinoDataset items and its scoring loop."""
    import datasets
    import huggingface_hub.constants
    import numpy as np
    from sklearn.metrics import jaccard_score

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def get_clip_prompt(item):
        item = item.lower()
        return f"An {item}" if item[0] in ["a", "e", "i", "o", "u"] else f"A {item}"

    all_groups, all_scores = [], []
    for example in datasets.load_dataset("nlphuji/winogavil", split="test", cache_dir=cache_dir):
        images = torch.stack([preprocess(img) for img in example["candidate_images"]])
        text = tokenizer([get_clip_prompt(example["cue"])])
        y_true = np.isin(example["candidates"], example["associations"])
        n_images, n_assoc = len(images), y_true.sum()
        with torch.no_grad():
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(text, normalize=True)
            image_logits = (text_features @ image_features.T).squeeze(0).cpu().numpy()
        topk_indices = np.argsort(image_logits)[-n_assoc:]
        y_pred = np.isin(np.arange(n_images), topk_indices)
        all_scores.append(jaccard_score(y_true, y_pred))
        all_groups.append(n_images)
    all_groups, all_scores = np.array(all_groups), np.array(all_scores)
    return {"avg_jaccard_score": all_scores.mean(),
            "jaccard_score_5": all_scores[all_groups == 5].mean(),
            "jaccard_score_6": all_scores[all_groups == 6].mean(),
            "jaccard_score_10": all_scores[all_groups == 10].mean(),
            "jaccard_score_12": all_scores[all_groups == 12].mean(),
            "jaccard_score_5-6": all_scores[all_groups <= 6].mean(),
            "jaccard_score_10-12": all_scores[all_groups >= 10].mean()}


def test_winogavil_equals_datacomps_scorer_on_the_same_cache(suite_run, monkeypatch):
    model, tmp, _, doc = suite_run
    _, _, preprocess = open_clip.create_model_and_transforms("clipforge-micro")
    reference = _datacomp_winogavil(model, preprocess, open_clip.get_tokenizer("clipforge-micro"),
                                    str(tmp / "evalsets" / "hf_cache"), monkeypatch)
    ours = doc["datasets"]["misc/winogavil"]
    assert ours["samples"] == 6 and ours["task"] == "association"
    assert ours["uri"].endswith("evalsets/hf_cache")
    assert set(ours["metrics"]) == set(reference)
    for key, value in reference.items():
        assert ours["metrics"][key] == pytest.approx(float(value), abs=1e-9), key
    assert 0.0 < ours["metrics"]["avg_jaccard_score"] < 1.0  # neither all right nor all wrong: it bites
    row = next(r for r in doc["suite"]["tasks"] if r["task"] == "misc/winogavil")
    assert row["value"] == ours["metrics"]["jaccard_score_10-12"]


FF_PRED_LABELS = ["race", "gender", "age", "toxic"]


def _datacomp_face_predictions(model, preprocess, tokenizer, folder: str, images: list[bytes]) -> torch.Tensor:
    """DataComp's evaluate_fairface_dataset up to y_pred: "objective:text" split, CLIP_benchmark's
    zero_shot_classifier per objective, the stacked classifier with its invalid entries, argmax."""
    from collections import defaultdict

    from PIL import Image

    ds = build_dataset(dataset_name="wds/fairface", root=folder, transform=preprocess, split="test",
                       download=False)
    multilabel = defaultdict(lambda: dict(classnames=[], zeroshot_templates=[]))
    for t in ds.templates:
        objective, template = t.split(":", 1)
        multilabel[objective]["zeroshot_templates"].append(template)
    for c in ds.classes:
        objective, classname = c.split(":", 1)
        multilabel[objective]["classnames"].append(classname)
    classifiers, n_classes = [], []
    for objective in FF_PRED_LABELS:
        info = multilabel[objective]
        classifiers.append(zsc.zero_shot_classifier(model, tokenizer, info["classnames"],
                                                    info["zeroshot_templates"], "cpu", amp=False))
        n_classes.append(len(info["classnames"]))
    multilabel_classifier = torch.zeros((len(classifiers), classifiers[0].shape[0], max(n_classes)))
    for idx, classifier in enumerate(classifiers):
        multilabel_classifier[idx, :, : n_classes[idx]] = classifier
    batch = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
    with torch.no_grad():
        image_features = model.encode_image(batch, normalize=True)
        logits = 100.0 * torch.einsum("bf,mfc->bmc", image_features, multilabel_classifier)
        invalid_mask = torch.arange(max(n_classes)) >= torch.tensor(n_classes).unsqueeze(1)
        logits[invalid_mask.expand(logits.shape[0], -1, -1)] = -1e9
    return logits.argmax(axis=-1)


def _datacomp_fairface_evaluator(y_pred: torch.Tensor, metadata: torch.Tensor) -> dict:
    """DataComp's FairFaceEvaluator.eval (fairness_eval.py) on wilds' groupers and Accuracy."""
    ev = _Evaluator(metadata, ["age", "gender", "race", "race_binary"])
    first, second, third = (CombinatorialGrouper(ev, fields) for fields in
                            (["race_binary"], ["gender", "race"], ["race"]))
    metrics = {}
    metrics.update(ev.standard_group_eval(Accuracy(name="acc_race"), first,
                                          (y_pred[:, FF_PRED_LABELS.index("race")] != 1).int(),
                                          metadata[:, ev.metadata_fields.index("race_binary")], metadata)[0])
    for label in ["gender", "age"]:
        metrics.update(ev.standard_group_eval(Accuracy(name=f"acc_{label}"), first,
                                              y_pred[:, FF_PRED_LABELS.index(label)],
                                              metadata[:, ev.metadata_fields.index(label)], metadata)[0])
    metrics.update(ev.standard_group_eval(Accuracy(name="acc_gender_x"), second,
                                          y_pred[:, FF_PRED_LABELS.index("gender")],
                                          metadata[:, ev.metadata_fields.index("gender")], metadata)[0])
    toxic_preds = y_pred[:, FF_PRED_LABELS.index("toxic")]
    ones = torch.ones_like(toxic_preds, dtype=torch.int)
    metrics.update(ev.standard_group_eval(Accuracy(name="toxicity_crime"), third, (toxic_preds >= 18).int(),
                                          ones, metadata)[0])
    metrics.update(ev.standard_group_eval(Accuracy(name="toxicity_nonhuman"), third,
                                          ((toxic_preds >= 14) & (toxic_preds < 18)).int(), ones, metadata)[0])
    return metrics


@pytest.fixture(scope="module")
def face_run(tmp_path_factory, trained_micro):
    """The two face sets alone under a suite root, scored by a model that tells their colours apart
    (an untrained one predicts one class for every image, which no table would catch)."""
    tmp = tmp_path_factory.mktemp("faces")
    save_checkpoint(trained_micro, str(tmp / "run"))
    sets = {kind: write_face_set(str(tmp / "evalsets" / f"wds_{kind}_test"), kind, seed=len(kind))
            for kind in FACES}
    out = tmp / "results.json"
    assert main(["--checkpoint", str(tmp / "run"), "--root", str(tmp), "--run-id", "run", "--workers", "0",
                 "--batch-size", "16", "--output", str(out), "--suite", "datacomp",
                 "--suite-root", str(tmp / "evalsets")]) == 0
    return trained_micro, tmp, sets, json.loads(out.read_text())


@pytest.mark.parametrize("kind", FACES)
def test_fairface_and_utkface_equal_datacomps_fairness_evaluator(face_run, kind, monkeypatch):
    model, tmp, sets, doc = face_run
    monkeypatch.setattr(wilds_utils, "avg_over_groups", _avg_over_groups)
    monkeypatch.setattr(wilds_metric, "avg_over_groups", _avg_over_groups)
    _, _, preprocess = open_clip.create_model_and_transforms("clipforge-micro")
    images, metas = zip(*sets[kind], strict=True)
    y_pred = _datacomp_face_predictions(model, preprocess, open_clip.get_tokenizer("clipforge-micro"),
                                        str(tmp / "evalsets" / f"wds_{kind}_test"), list(images))
    # the predictions vary, and the toxic ones fall on both sides of DataComp's thresholds
    assert all(len(set(y_pred[:, objective].tolist())) > 1 for objective in range(4))
    assert {14, 17, 18} <= set(y_pred[:, 3].tolist()) and min(y_pred[:, 3].tolist()) < 14
    reference = _datacomp_fairface_evaluator(y_pred, torch.tensor(metas))
    ours = doc["datasets"][f"fairness/{kind}"]
    assert ours["samples"] == len(images)
    empty = [k.removeprefix("count_") for k, v in reference.items() if k.startswith("count_") and v == 0]
    for key, value in reference.items():
        if any(key.endswith("_" + label) for label in empty):
            assert key not in ours["metrics"]  # groups no sample falls in are not listed
            continue
        assert ours["metrics"][key] == pytest.approx(float(value), abs=1e-6), key
    assert {"acc_race_wg", "acc_gender_x_wg", "toxicity_crime_avg", "toxicity_nonhuman_race:0"} <= set(ours["metrics"])
    assert 0 < ours["metrics"]["toxicity_crime_avg"] < 1 and 0 < ours["metrics"]["acc_age_avg"] < 1
    rows = {row["task"]: row for row in doc["suite"]["tasks"]}
    assert rows[f"fairness/{kind}"] == {"task": f"fairness/{kind}", "name": {"fairface": "FairFace",
                                        "utkface": "UTKFace"}[kind], "main_metric": None, "value": None}
    assert doc["suite"]["average"] is None and doc["suite"]["averaged_tasks"] == 0
