"""The pipeline's steps: lightweight Python components that call each stage's command.

Each runs in its stage's image (`base_image`, registry and tag chosen at compile time) where the
`clipforge` package is installed, so the body only shells out to `python -m stages.<stage>`. Bodies
must be self-contained: kfp ships the function's source, not this module.
"""

from typing import NamedTuple

from kfp import dsl

from pipelines.images import image


def download(root: str, run_id: str, url_list: str, demo: bool, demo_samples: int, image_size: int,
             samples_per_shard: int, processes: int, threads: int, extra_args: str
             ) -> NamedTuple("DownloadOutputs", [("run_id", str), ("data", str), ("demo_eval", str)]):
    """img2dataset into {root}/{run_id}/data; returns the run id it used and the data URI."""
    import shlex
    import subprocess
    import sys
    import time
    from collections import namedtuple

    run_id = run_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    cmd = [sys.executable, "-m", "stages.download", "--root", root, "--run-id", run_id,
           "--samples-per-shard", str(samples_per_shard), "--processes", str(processes),
           "--threads", str(threads)]
    if image_size:
        cmd += ["--image-size", str(image_size)]
    cmd += ["--demo", "--demo-samples", str(demo_samples)] if demo else ["--url-list", url_list]
    cmd += shlex.split(extra_args)
    print("running:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    run_dir = f"{root.rstrip('/')}/{run_id}"
    outputs = namedtuple("DownloadOutputs", ["run_id", "data", "demo_eval"])
    return outputs(run_id, f"{run_dir}/data", f"demo={run_dir}/evalsets/demo" if demo else "")


def train(root: str, run_id: str, train_data: str, model: str, batch_size: int, steps: int, epochs: int,
          lr: float, warmup: int, precision: str, workers: int, save_every_steps: int, extra_args: str,
          launcher: str, nodes: int, procs_per_node: int, gpus_per_node: int, cpu: str, memory: str,
          shm_size: str, train_image: str, default_train_image: str, image_pull_policy: str, namespace: str,
          active_deadline_s: int, cleanup: str, gpu_node_selector: str) -> str:
    """torchrun here (launcher='local') or a PyTorchJob on the cluster; returns the LATEST pointer URI."""
    import shlex

    from pipelines.launcher import cluster_train_job, run_pytorchjob, run_torchrun_local

    args = ["--root", root, "--run-id", run_id, "--train-data", train_data, "--model", model,
            "--batch-size", str(batch_size), "--lr", str(lr), "--warmup", str(warmup),
            "--precision", precision, "--workers", str(workers), "--save-every-steps", str(save_every_steps),
            "--resume", "latest"]
    args += ["--steps", str(steps)] if steps > 0 else ["--epochs", str(epochs)]
    args += shlex.split(extra_args)
    if launcher == "local":
        run_torchrun_local(args, nproc=procs_per_node)
    elif launcher == "pytorchjob":
        job = cluster_train_job(run_id, args, image=train_image or default_train_image,
                                image_pull_policy=image_pull_policy, namespace=namespace, nodes=nodes,
                                procs_per_node=procs_per_node, gpus_per_node=gpus_per_node, cpu=cpu,
                                memory=memory, shm_size=shm_size, active_deadline_s=active_deadline_s,
                                gpu_node_selector=gpu_node_selector)
        run_pytorchjob(job, cleanup=cleanup)
    else:
        raise ValueError(f"launcher {launcher!r}: 'pytorchjob' or 'local'")
    return f"{root.rstrip('/')}/{run_id}/checkpoints/LATEST"


def evaluate(root: str, run_id: str, checkpoint: str, eval_data: str, demo_eval: str, val_data: str,
             batch_size: int, workers: int, extra_args: str) -> str:
    """Zero-shot and retrieval on the eval sets (space-separated NAME=URI, default: the demo's eval
    set when there is one); returns results.json's URI."""
    import shlex
    import subprocess
    import sys

    results = f"{root.rstrip('/')}/{run_id}/eval/results.json"
    cmd = [sys.executable, "-m", "stages.evaluate", "--root", root, "--run-id", run_id,
           "--checkpoint", checkpoint, "--batch-size", str(batch_size), "--workers", str(workers),
           "--output", results]
    eval_sets = (eval_data or demo_eval).split()
    if eval_sets:
        cmd += ["--eval-data", *eval_sets]
    if val_data:
        cmd += ["--val-data", val_data]
    cmd += shlex.split(extra_args)
    print("running:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return results


def export(root: str, run_id: str, checkpoint: str, push_to_hub: str, extra_args: str) -> str:
    """open_clip Hub layout in {root}/{run_id}/export (pushed when push_to_hub names a repo)."""
    import shlex
    import subprocess
    import sys

    output = f"{root.rstrip('/')}/{run_id}/export"
    cmd = [sys.executable, "-m", "stages.export", "--root", root, "--run-id", run_id,
           "--checkpoint", checkpoint, "--output", output]
    if push_to_hub:
        cmd += ["--push-to-hub", push_to_hub]
    cmd += shlex.split(extra_args)
    print("running:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return output


STEPS = {"download": download, "train": train, "evaluate": evaluate, "export": export}


def make_components(registry: str = "", tag: str = "") -> dict:
    """The four steps as kfp components on their stage's image (the image already has kfp)."""
    return {stage: dsl.component(func, base_image=image(stage, registry, tag), install_kfp_package=False)
            for stage, func in STEPS.items()}
