"""DataComp's WILDS and fairness subgroup metrics, from predictions and each sample's `.npy` metadata.

The definitions are DataComp's `eval_utils/wilds_eval.py` and `fairness_eval.py` (which build on the
`wilds` package's Accuracy/F1/Recall and CombinatorialGrouper); the key names are the ones they
produce (`acc_avg`, `acc_<field>:<value>`, `count_<field>:<value>`, `acc_wg`, `F1-macro_all`, ...).
Kept here rather than importing `wilds`: its group averaging needs torch_scatter (DataComp patches
it out at import time) and it pins old dependencies; what is needed is a few lines of torch.
Groups that no sample falls in are not listed (wilds lists them with a count of 0).
"""

from __future__ import annotations

import itertools

import torch

from stages.common.errors import DataError

# DataComp's metadata fields (the columns of each sample's .npy), by dataset.
FIELDS = {
    "iwildcam": ["location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"],
    "camelyon17": ["hospital", "slide", "y"],
    "fmow": ["region", "year", "y"],
    "dollar_street": ["income_ds", "income_meta", "region"],
    "geode": ["region", "country"],
    "fairface": ["age", "gender", "race", "race_binary"],
    "utkface": ["age", "gender", "race", "race_binary"],
}
# fairface/utkface: classnames and templates are "objective:text"; one prediction per objective.
FAIRFACE_OBJECTIVES = ["race", "gender", "age", "toxic"]


def evaluator_for(name: str) -> str:
    """The subgroup evaluator a dataset name asks for ('' for none)."""
    from stages.common.classmeta import normalise

    key = normalise(name)
    return key if key in FIELDS else ""


def metadata_array(rows: list, name: str) -> torch.Tensor:
    """[N, fields] long tensor of the samples' .npy metadata, checked against the dataset's fields."""
    fields = FIELDS[name]
    if any(r is None for r in rows):
        raise DataError(f"eval set {name}: a sample has no .npy metadata ({len(fields)} values: {fields}); "
                        "its subgroup metrics need one per sample")
    meta = torch.stack([torch.as_tensor(r).reshape(-1) for r in rows]).long()
    if meta.shape[1] < len(fields):
        raise DataError(f"eval set {name}: .npy metadata has {meta.shape[1]} values, expected "
                        f"{len(fields)} ({fields})")
    return meta


def group_eval(name: str, correct: torch.Tensor, metadata: torch.Tensor, by: list[str],
               fields: list[str], aggregate: bool = True) -> dict[str, float]:
    """wilds' standard_group_eval for an element-wise metric: its mean, per group, worst group."""
    out: dict[str, float] = {}
    correct = correct.float()
    if aggregate:
        out[f"{name}_avg"] = correct.mean().item() if len(correct) else 0.0
    columns = metadata[:, [fields.index(f) for f in by]]
    cardinality = (columns.max(dim=0).values + 1).tolist()
    worst = None
    # wilds' CombinatorialGrouper order: the first field varies fastest; names list the last first.
    for values in itertools.product(*[range(c) for c in reversed(cardinality)]):
        values = list(reversed(values))
        mask = (columns == torch.tensor(values)).all(dim=1)
        count = int(mask.sum())
        if not count:
            continue
        label = "_".join(f"{f}:{v}" for f, v in reversed(list(zip(by, values, strict=True))))
        value = correct[mask].mean().item()
        out[f"{name}_{label}"] = value
        out[f"count_{label}"] = float(count)
        worst = value if worst is None else min(worst, value)
    out[f"{name}_wg"] = worst if worst is not None else 0.0
    return out


def _macro(kind: str, pred: torch.Tensor, labels: torch.Tensor) -> float:
    from sklearn.metrics import f1_score, recall_score

    fn = f1_score if kind == "F1" else recall_score
    return float(fn(labels.numpy(), pred.numpy(), average="macro", labels=labels.unique().numpy()))


def wilds_metrics(name: str, logits: torch.Tensor, labels: torch.Tensor,
                  metadata: torch.Tensor) -> dict[str, float]:
    """DataComp's extra metrics of iwildcam, camelyon17, fmow, dollar_street and geode."""
    fields = FIELDS[name]
    pred = logits.argmax(dim=1)
    correct = pred == labels
    if name == "iwildcam":
        return {"acc_avg": correct.float().mean().item(), "recall-macro_all": _macro("recall", pred, labels),
                "F1-macro_all": _macro("F1", pred, labels)}
    if name == "camelyon17":
        return group_eval("acc", correct, metadata, ["slide"], fields)
    if name == "fmow":
        out = group_eval("acc", correct, metadata, ["year"], fields)
        out["acc_worst_year"] = out.pop("acc_wg")
        regions = group_eval("acc", correct, metadata, ["region"], fields, aggregate=False)
        out["acc_worst_region"] = regions.pop("acc_wg")
        return {**out, **regions}
    if name == "dollar_street":
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        return group_eval("acc_top5", (top5 == labels.view(-1, 1)).any(dim=1), metadata, ["income_ds"], fields)
    if name == "geode":
        return group_eval("acc", correct, metadata, ["region"], fields)
    raise ValueError(name)


def split_objectives(classnames: list[str], templates: list[str], where: str) -> dict[str, tuple]:
    """fairface/utkface: {objective: (classnames, templates)} from "objective:text" lines."""
    out: dict[str, tuple[list[str], list[str]]] = {o: ([], []) for o in FAIRFACE_OBJECTIVES}
    for index, lines in ((0, classnames), (1, templates)):
        for line in lines:
            objective, sep, text = line.partition(":")
            if not sep or objective not in out:
                raise DataError(f"{where}: line {line!r} is not 'objective:text' with an objective of "
                                f"{FAIRFACE_OBJECTIVES}")
            out[objective][index].append(text)
    empty = [o for o, (names, temps) in out.items() if not names or not temps]
    if empty:
        raise DataError(f"{where}: no class names or templates for objective(s) {empty}")
    return out


def fairface_metrics(pred: dict[str, torch.Tensor], metadata: torch.Tensor) -> dict[str, float]:
    """DataComp's FairFaceEvaluator: race (white vs not), gender, age by race_binary; gender by
    gender x race; the crime- and non-human-related predictions by race."""
    fields = FIELDS["fairface"]
    meta = {f: metadata[:, i] for i, f in enumerate(fields)}
    out = group_eval("acc_race", (pred["race"] != 1).long() == meta["race_binary"], metadata,
                     ["race_binary"], fields)
    for label in ("gender", "age"):
        out.update(group_eval(f"acc_{label}", pred[label] == meta[label], metadata, ["race_binary"], fields))
    out.update(group_eval("acc_gender_x", pred["gender"] == meta["gender"], metadata, ["gender", "race"], fields))
    toxic = pred["toxic"]
    out.update(group_eval("toxicity_crime", toxic >= 18, metadata, ["race"], fields))
    out.update(group_eval("toxicity_nonhuman", (toxic >= 14) & (toxic < 18), metadata, ["race"], fields))
    return out
