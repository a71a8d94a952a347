"""What evaluation leaves behind: results.json, a table for humans, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from stages.common import storage
from stages.common.metrics import StageMetrics

FORMAT = "clipforge.eval/1"


def results_document(results: dict[str, dict[str, Any]], model: dict[str, Any]) -> dict[str, Any]:
    """results.json: per dataset its metrics, sample count, model, checkpoint step and elapsed time."""
    datasets = {name: {**res, "model": model["name"], "checkpoint": model["checkpoint"],
                       "checkpoint_step": model["step"]} for name, res in results.items()}
    return {"format": FORMAT, "model": model, "datasets": datasets}


def write_results(uri: str, document: dict[str, Any]) -> None:
    storage.write_json(uri, document)


def table(document: dict[str, Any]) -> str:
    """One row per dataset and metric, aligned."""
    rows = [("dataset", "task", "samples", "metric", "value")]
    for name, res in document["datasets"].items():
        task = res["task"].removeprefix("zeroshot_")
        for metric, value in res["metrics"].items():
            rows.append((name, task, str(res["samples"]), metric, f"{value:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class EvalMetrics:
    """clipforge_evaluate_metric{dataset,metric}, clipforge_evaluate_samples_total{dataset}, ..."""

    def __init__(self, run_id: str):
        self.stage = StageMetrics("evaluate", run_id, const_labels={"run_id": run_id})
        self.metric = self.stage.gauge("metric", "Evaluation metric of the model on a dataset",
                                       labels=("dataset", "metric"))
        self.samples = self.stage.counter("samples_total", "Samples evaluated", labels=("dataset",))

    def record(self, document: dict[str, Any]) -> None:
        for name, res in document["datasets"].items():
            for metric, value in res["metrics"].items():
                self.metric.labels(dataset=name, metric=metric).set(value)
            self.samples.labels(dataset=name).inc(res["samples"])
        suite = document.get("suite")
        if suite and suite.get("average") is not None:
            self.metric.labels(dataset=suite["name"], metric="average").set(suite["average"])
