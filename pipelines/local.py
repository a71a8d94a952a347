"""`clipforge pipeline run --local`: the same pipeline through kfp.local, torchrun instead of PyTorchJob."""

import os
import time

from pipelines.pipeline import build_pipeline
from pipelines.results import eval_table, export_listing, read_json


def _absolute(root: str) -> str:
    """Steps run as subprocesses; a local root must not depend on their working directory."""
    return root if "://" in root else os.path.abspath(root)


def run_local(params: dict, outputs_dir: str = "") -> dict:
    """Runs the whole pipeline here; returns the run's URIs (run_dir, results, export).

    kfp.local keeps each step's outputs and logs in `outputs_dir` (default: {root}/.kfp-local for a
    local root, else ./runs/.kfp-local).
    """
    from kfp import local

    params = dict(params)
    params.setdefault("root", "./runs")
    params["root"] = _absolute(params["root"])
    params["run_id"] = params.get("run_id") or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    params["launcher"] = "local"
    params.setdefault("procs_per_node", 2)  # the two cores of a laptop-sized machine
    if not outputs_dir:
        outputs_dir = os.path.join(params["root"] if "://" not in params["root"] else "runs", ".kfp-local")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=os.path.abspath(outputs_dir),
               raise_on_error=True)
    build_pipeline()(**params)
    run_dir = f"{params['root'].rstrip('/')}/{params['run_id']}"
    return {"run_dir": run_dir, "results": f"{run_dir}/eval/results.json", "export": f"{run_dir}/export"}


def report(uris: dict) -> str:
    return "\n\n".join([f"run: {uris['run_dir']}", eval_table(read_json(uris["results"])),
                        export_listing(uris["export"])])
