"""torchx components for clipforge.

    torchx run -s local_cwd pipelines/torchx_components.py:train --nproc_per_node 2 -- \\
        --train-data ./runs/demo/data --root ./runs --run-id demo --steps 100

runs `python -m stages.train` under torchrun with two processes on this machine (gloo on CPU,
NCCL on GPUs); the same component runs on a cluster scheduler with the train image.
"""

import torchx.specs as specs
from torchx.components.dist import torchrun

# torchx reads the annotations at run time, so they stay real types (no postponed evaluation)
TRAIN_IMAGE = "ghcr.io/clipforge/clipforge-train:latest"  # as pipelines.images names it
# torchrun's agents need these for restarts that re-join in one round (as pipelines.pytorchjob.TORCHRUN_ENV)
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def train(
    *script_args: str,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    image: str = TRAIN_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    env: dict[str, str] | None = None,
) -> specs.AppDef:
    """Train an open_clip model with clipforge's trainer (`clipforge train`) under torchrun.

    Args:
        script_args: the trainer's flags (`clipforge train --help`), after `--`
        nproc_per_node: processes (ranks) per node
        nnodes: number of nodes
        image: container image with the train stage (ignored by local_cwd)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: times the scheduler reruns a failed job (pair with `--resume latest`)
        rdzv_port: rendezvous port on the first node
        env: extra environment variables (on top of the ones torchrun needs to restart cleanly)
    """
    return torchrun(*script_args, m="stages.train", image=image, name="clipforge-train", cpu=cpu,
                    gpu=gpu, memMB=memMB, j=f"{nnodes}x{nproc_per_node}", env={**TORCHRUN_ENV, **(env or {})},
                    max_retries=max_retries, rdzv_port=rdzv_port)
