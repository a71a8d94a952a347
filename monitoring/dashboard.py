"""The clipforge Grafana dashboard, as data: one entry per panel, rendered to JSON by render.py.

Trainer series are filtered by namespace, run and job (job = the PyTorchJob's name, set by the
PodMonitor's jobLabel); the batch stages' series come from the Pushgateway (job = clipforge_<stage>),
so they are filtered by namespace and run only. Every rank reports the samples of all ranks, so
totals take the max over ranks, not the sum.
"""

from __future__ import annotations

TRAIN = 'namespace=~"$namespace", run_id=~"$run", job=~"$job"'
BATCH = 'namespace=~"$namespace", run_id=~"$run"'
GPU_PODS = 'namespace=~"$namespace", pod=~"($job)-(master|worker)-[0-9]+"'
RATE = "$__rate_interval"

# Panels whose metrics come from outside clipforge (DCGM exporter, training operator).
EXTERNAL_METRICS = ("DCGM_FI_", "training_operator_")

# (row, title, panel type, unit, [(expr, legend)], description)
PANELS = [
    ("Training", "Samples/s (total)", "timeseries", "short", [
        (f"max by (run_id) (rate(clipforge_train_samples_total{{{TRAIN}}}[{RATE}]))", "{{run_id}}")],
     "Image-text pairs per second over all ranks."),
    ("Training", "Samples/s per GPU", "timeseries", "short", [
        (f"max by (run_id) (rate(clipforge_train_samples_total{{{TRAIN}}}[{RATE}]))"
         f" / count by (run_id) (clipforge_train_samples_total{{{TRAIN}}})", "{{run_id}}")],
     "Total throughput divided by the number of ranks."),
    ("Training", "MFU", "timeseries", "percentunit", [
        (f"avg by (run_id) (clipforge_train_mfu_ratio{{{TRAIN}}})", "{{run_id}}")],
     "Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (0 when the peak is unknown)."),
    ("Training", "Loss", "timeseries", "short", [
        (f"avg by (run_id) (clipforge_train_loss{{{TRAIN}}})", "{{run_id}}")],
     "Contrastive training loss of the last step, averaged over ranks."),
    ("Training", "Learning rate", "timeseries", "short", [
        (f"max by (run_id) (clipforge_train_learning_rate{{{TRAIN}}})", "{{run_id}}")], ""),
    ("Training", "Logit scale", "timeseries", "short", [
        (f"max by (run_id) (clipforge_train_logit_scale{{{TRAIN}}})", "{{run_id}}")],
     "exp(logit_scale); open_clip clamps it at 100."),
    ("Training", "Data-wait fraction", "timeseries", "percentunit", [
        (f"rate(clipforge_train_data_wait_seconds_total{{{TRAIN}}}[{RATE}])", "{{run_id}} rank {{rank}}")],
     "Share of wall time each rank waits for its next batch; high means loader-bound."),
    ("Training", "Step time p50 / p95", "timeseries", "s", [
        (f"histogram_quantile(0.5, sum by (run_id, le) "
         f"(rate(clipforge_train_step_duration_seconds_bucket{{{TRAIN}}}[{RATE}])))", "p50 {{run_id}}"),
        (f"histogram_quantile(0.95, sum by (run_id, le) "
         f"(rate(clipforge_train_step_duration_seconds_bucket{{{TRAIN}}}[{RATE}])))", "p95 {{run_id}}")],
     "Wall time of one optimizer step, from the step-duration histogram."),
    ("Training", "Checkpoint age", "stat", "s", [
        (f"time() - max by (run_id) (clipforge_train_last_checkpoint_timestamp_seconds{{{TRAIN}}} > 0)",
         "{{run_id}}")],
     "Seconds since the newest checkpoint (a preemption loses at most this much)."),
    ("Training", "Step", "stat", "short", [
        (f"max by (run_id) (clipforge_train_step{{{TRAIN}}})", "{{run_id}}")], "Optimizer steps done."),
    ("Training", "Non-finite steps", "stat", "short", [
        (f"max by (run_id) (clipforge_train_nonfinite_steps_total{{{TRAIN}}})", "{{run_id}}")],
     "Steps skipped by the NaN guard since the run started."),
    ("Training", "Job restarts", "stat", "short", [
        ('sum by (job_namespace) (increase(training_operator_jobs_restarted_total'
         '{job_namespace=~"$namespace", framework="pytorch"}[$__range]))', "{{job_namespace}}")],
     "PyTorchJob restarts counted by the training operator in the shown range."),
    ("GPUs", "GPU utilisation", "timeseries", "percent", [
        (f"avg by (pod, gpu) (DCGM_FI_DEV_GPU_UTIL{{{GPU_PODS}}})", "{{pod}} gpu {{gpu}}")],
     "DCGM exporter; needs dcgm-exporter scraped with honorLabels so pod/namespace are the trainer's."),
    ("GPUs", "GPU memory used", "timeseries", "bytes", [
        (f"max by (pod, gpu) (DCGM_FI_DEV_FB_USED{{{GPU_PODS}}}) * 1024 * 1024", "{{pod}} gpu {{gpu}}")],
     "DCGM framebuffer memory in use (DCGM reports MiB)."),
    ("Data and evaluation", "Download success rate", "stat", "percentunit", [
        (f"max by (run_id) (clipforge_download_success_ratio{{{BATCH}}})", "{{run_id}}")],
     "Share of URLs that became training samples."),
    ("Data and evaluation", "Download images/s", "stat", "short", [
        (f"max by (run_id) (clipforge_download_images_per_second{{{BATCH}}})", "{{run_id}}")], ""),
    ("Data and evaluation", "Eval metrics per dataset", "table", "short", [
        (f"max by (run_id, dataset, metric) (clipforge_evaluate_metric{{{BATCH}}})", "")],
     "Zero-shot accuracy and retrieval recall of the evaluated checkpoint."),
    ("Data and evaluation", "Stage durations", "bargauge", "s", [
        ('max by (run_id, stage) ({__name__=~"clipforge_(download|train|evaluate|export)_duration_seconds", '
         f'job=~"clipforge_.+", {BATCH}}})', "{{stage}}")],
     "Wall time each stage reported when it finished (pushed to the Pushgateway)."),
]


def _variable(name: str, label: str, query: str, include_all: bool) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
            "includeAll": include_all, "allValue": ".*" if include_all else None, "multi": include_all,
            "sort": 1, "current": {}, "options": []}


DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VARIABLES = [
    {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
     "current": {}, "options": [], "refresh": 1},
    _variable("namespace", "Namespace",
              'label_values({__name__=~"clipforge_(train_step|download_success_ratio|evaluate_duration_seconds)"}, '
              "namespace)", True),
    _variable("run", "Run",
              'label_values({__name__=~"clipforge_(train_step|download_success_ratio|evaluate_duration_seconds)", '
              'namespace=~"$namespace"}, run_id)', False),
    _variable("job", "Job", 'label_values(clipforge_train_step{namespace=~"$namespace", run_id=~"$run"}, job)',
              True),
]


def _panel(panel_id: int, title: str, kind: str, unit: str, targets: list, description: str,
           grid: dict) -> dict:
    instant = kind in ("stat", "table", "bargauge")
    panel = {
        "id": panel_id, "type": kind, "title": title, "description": description,
        "datasource": DATASOURCE, "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend, "instant": instant, "range": not instant,
                     **({"format": "table"} if kind == "table" else {})}
                    for i, (expr, legend) in enumerate(targets)],
        "options": {},
    }
    if kind == "table":
        panel["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True}, "renameByName": {"Value": "value"}}}]
    return panel


def _row(panel_id: int, title: str, y: int) -> dict:
    return {"id": panel_id, "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}


def build() -> dict:
    """The dashboard JSON (Grafana schema 39): rows of 8-wide panels, ids unique and stable."""
    panels, row, next_id, x, y = [], None, 1, 0, 0
    for row_title, title, kind, unit, targets, description in PANELS:
        if row_title != row:
            y += 0 if x == 0 else 8
            panels.append(_row(next_id, row_title, y))
            next_id, row, x, y = next_id + 1, row_title, 0, y + 1
        panels.append(_panel(next_id, title, kind, unit, targets, description,
                             {"h": 8, "w": 8, "x": x, "y": y}))
        next_id += 1
        x = (x + 8) % 24
        y += 8 if x == 0 else 0
    return {
        "uid": "clipforge", "title": "clipforge", "tags": ["clipforge", "training"],
        "description": "clipforge CLIP training: throughput, loss, checkpoints, GPUs, data and evaluation",
        "schemaVersion": 39, "version": 1, "editable": True, "timezone": "utc",
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": VARIABLES}, "annotations": {"list": []}, "links": [],
        "panels": panels,
    }
