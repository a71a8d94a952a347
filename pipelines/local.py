"""`clipforge pipeline run --local`: the same pipeline through kfp.local, torchrun instead of PyTorchJob."""

import os
import time

from pipelines.pipeline import build_pipeline
from pipelines.results import eval_table, export_listing, read_json


def _absolute(root: str) -> str:
    """Steps run as subprocesses; a local root must not depend on their working directory."""
    return root if "://" in root else os.path.abspath(root)


# The compiled pipeline's defaults are a production GPU run; here the demo runs on a laptop:
# the generated demo set, the small demo model on the CPU with two local ranks, minutes not days.
DEMO_DEFAULTS = {
    "root": "./runs", "demo": True, "demo_samples": 4000, "samples_per_shard": 500, "download_tasks": 1,
    "download_processes": 1, "download_threads": 32, "model": "clipforge-demo", "batch_size": 64,
    "steps": 800, "epochs": 1, "lr": 2e-3, "warmup": 20, "precision": "fp32", "workers": 1,
    "save_every_steps": 100, "nodes": 1, "procs_per_node": 2, "gpus_per_node": 0, "eval_batch_size": 64,
}


def run_local(params: dict, outputs_dir: str = "") -> dict:
    """Runs the whole pipeline here; returns the run's URIs (run_dir, results, export).

    kfp.local keeps each step's outputs and logs in `outputs_dir` (default: {root}/.kfp-local for a
    local root, else ./runs/.kfp-local).
    """
    from kfp import local

    given, params = params, {**DEMO_DEFAULTS, **params}
    if given.get("url_list") and "demo" not in given:  # a URL list given is the data to use
        params["demo"] = False
    params["root"] = _absolute(params["root"])
    params["run_id"] = params.get("run_id") or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    params["launcher"] = "local"
    if not outputs_dir:
        outputs_dir = os.path.join(params["root"] if "://" not in params["root"] else "runs", ".kfp-local")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=os.path.abspath(outputs_dir),
               raise_on_error=True)
    outputs = build_pipeline()(**params).outputs
    run_dir = f"{params['root'].rstrip('/')}/{params['run_id']}"
    return {"run_dir": run_dir, "results": f"{run_dir}/eval/results.json", "export": f"{run_dir}/export",
            "metrics": outputs["metrics"], "eval_table": outputs["eval_table"], "model": outputs["model"]}


def report(uris: dict) -> str:
    """The eval table, the export folder and the run's KFP artifacts (what the KFP UI would show)."""
    model, metrics = uris["model"], uris["metrics"]
    artifacts = (f"artifacts:\n  Metrics  {metrics.uri} ({len(metrics.metadata)} values)\n"
                 f"  Markdown {uris['eval_table'].uri}\n  Model    {model.uri}")
    return "\n\n".join([f"run: {uris['run_dir']}", eval_table(read_json(uris["results"])),
                         export_listing(uris["export"]), artifacts])
