"""The pipeline's steps: lightweight Python components that call each stage's command.

Each runs in its stage's image (`base_image`, registry and tag chosen at compile time) where the
`clipforge` package is installed, so a body imports `pipelines.stage_args` for the stage's argv and
shells out to `python -m stages.<stage>`. Bodies must be self-contained: kfp ships the function's
source, not this module.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Model, Output

from pipelines.images import image


def plan(root: str, run_id: str, demo: bool, url_list: str, download_tasks: int, launcher: str,
         gpus_per_node: int, procs_per_node: int, cleanup: str, on_existing: str
         ) -> NamedTuple("Plan", [("run_id", str), ("procs_per_node", int), ("eval_gpus", int)]):
    """Checks the run's parameters before any work and settles what the other steps share."""
    import time
    from collections import namedtuple

    from pipelines.launch_policy import check_launch, procs_for

    if demo == bool(url_list):
        raise ValueError(f"url_list={url_list!r}, demo={demo}: give a URL list, or demo=true without one")
    if download_tasks < 1:
        raise ValueError(f"download_tasks={download_tasks}: need at least 1")
    if demo and download_tasks > 1:  # each task would serve the demo from its own loopback server
        raise ValueError(f"download_tasks={download_tasks} with demo=true: the demo downloads in one task; "
                         "for a split download, serve the demo set (python -m stages.download.demo "
                         "--serve) and give its urls.parquet as url_list")
    check_launch(launcher, cleanup, on_existing)
    procs = procs_for(gpus_per_node, procs_per_node)
    print(f"root={root} run_id={run_id or '(new)'} download_tasks={download_tasks} procs_per_node={procs}")
    outputs = namedtuple("Plan", ["run_id", "procs_per_node", "eval_gpus"])
    return outputs(run_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime()), procs, 1 if gpus_per_node else 0)


def download_parts(root: str, run_id: str, num_parts: int, options: dict, extra_args: str) -> list:
    """One work item per download task. Each item carries all its task needs: inside a loop, a
    step reads only the loop item (kfp.local resolves other inputs there wrongly)."""
    return [{"root": root, "run_id": run_id, "num_parts": num_parts, "part_index": str(i), "options": options,
             "extra_args": extra_args} for i in range(num_parts)]


def download(part: dict) -> str:
    """img2dataset on one part of the URL list into {root}/{run_id}/data; returns the part's index."""
    import shlex
    import subprocess
    import sys

    from pipelines.stage_args import download_argv

    cmd = [sys.executable, "-m", "stages.download",
           *download_argv(part["root"], part["run_id"], part["options"], part["extra_args"],
                          num_parts=part["num_parts"], part_index=part["part_index"])]
    print("running:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return part["part_index"]


def merge_downloads(root: str, run_id: str, num_parts: int, parts: list, demo: bool
                    ) -> NamedTuple("DownloadOutputs", [("data", str), ("demo_eval", str)]):
    """One manifest.json over the parts' shards (nothing to merge for a single part)."""
    import shlex
    import subprocess
    import sys
    from collections import namedtuple

    from pipelines.stage_args import merge_argv, run_dir

    if num_parts > 1:
        cmd = [sys.executable, "-m", "stages.download", *merge_argv(root, run_id, num_parts)]
        print(f"merging {len(parts)} parts:", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    run = run_dir(root, run_id)
    return namedtuple("DownloadOutputs", ["data", "demo_eval"])(
        f"{run}/data", f"demo={run}/evalsets/demo" if demo else "")


def train(root: str, run_id: str, train_data: str, options: dict, extra_args: str, launcher: str,
          job: dict, default_image: str) -> str:
    """torchrun here (launcher='local') or a PyTorchJob on the cluster; returns the LATEST pointer URI."""
    from pipelines.launcher import launch_training
    from pipelines.stage_args import run_dir, train_argv

    args = train_argv(root, run_id, train_data, options, extra_args)
    launch_training(launcher, run_id, args, dict(job, image=job.get("image") or default_image))
    return f"{run_dir(root, run_id)}/checkpoints/LATEST"


def evaluate(root: str, run_id: str, checkpoint: str, eval_data: str, demo_eval: str, val_data: str,
             options: dict, extra_args: str, metrics: Output[Metrics], table: Output[Markdown]) -> str:
    """Zero-shot and retrieval on the eval sets (space-separated NAME=URI, default: the demo's eval
    set when there is one); the results go to results.json, the run's Metrics and a Markdown table."""
    import shlex
    import subprocess
    import sys

    from pipelines.results import eval_markdown, numeric_metrics, read_json
    from pipelines.stage_args import evaluate_argv

    argv = evaluate_argv(root, run_id, checkpoint, (eval_data or demo_eval).split(), val_data, options,
                         extra_args)
    cmd = [sys.executable, "-m", "stages.evaluate", *argv]
    print("running:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    results_uri = argv[argv.index("--output") + 1]
    if "--check-config" in argv:  # the stage only validated its command: there are no results
        return results_uri
    results = read_json(results_uri)
    for name, value in numeric_metrics(results).items():
        metrics.log_metric(name, value)
    with open(table.path, "w") as f:
        f.write(eval_markdown(results))
    return results_uri


def export(root: str, run_id: str, checkpoint: str, options: dict, extra_args: str, model: Output[Model]) -> str:
    """open_clip Hub layout in {root}/{run_id}/export (pushed when push_to_hub names a repo); the
    Model artifact points at that folder."""
    import shlex
    import subprocess
    import sys

    from pipelines.results import model_metadata
    from pipelines.stage_args import export_argv

    argv = export_argv(root, run_id, checkpoint, options, extra_args)
    cmd = [sys.executable, "-m", "stages.export", *argv]
    print("running:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    output = argv[argv.index("--output") + 1]
    if "--check-config" in argv:  # validated only: nothing was exported
        return output
    model.uri = output  # lineage points at the exported folder itself, not a copy of it
    model.metadata.update(model_metadata(output, checkpoint, options.get("push_to_hub") or ""))
    return output


STEPS = {"plan": ("download", plan), "download_parts": ("download", download_parts), "download": ("download", download),
         "merge_downloads": ("download", merge_downloads), "train": ("train", train),
         "evaluate": ("evaluate", evaluate), "export": ("export", export)}


def make_components(registry: str = "", tag: str = "") -> dict:
    """The steps as kfp components on their stage's image (the image already has kfp)."""
    return {name: dsl.component(func, base_image=image(stage, registry, tag), install_kfp_package=False)
            for name, (stage, func) in STEPS.items()}
