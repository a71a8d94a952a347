"""`python -m bench.steptimes OUT MODULE [ARGS ...]`: run MODULE as __main__, stamping each optimizer step.

The same instrument times clipforge's trainer and open_clip_train's without touching either loop:
torch's global optimizer post-step hook (`register_optimizer_step_post_hook`) records
`time.perf_counter()` right after every `optimizer.step()` in the process. The interval between
two stamps is one whole training iteration as the trainer runs it: waiting for data, forward,
backward, the update, and whatever the trainer does per step (logging, metrics, checkpoints).

On CUDA a stamp is taken without synchronising, so the host keeps running ahead of the device as
it normally does, except after the step counts listed in $BENCH_SYNC_STEPS (comma-separated,
1-based), where the device is synchronised first: the time between two such stamps is the true
time of the steps in between.

Each rank ($RANK, default 0) writes OUT.rank<r>.json at exit: {"start": perf_counter at launch,
"stamps": [...]} (perf_counter is CLOCK_MONOTONIC, comparable across processes of one machine).
Under torchrun: `torchrun ... -m bench.steptimes OUT MODULE ARGS ...`.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time

START = time.perf_counter()


def install(out: str) -> list[float]:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    sync_at = {int(s) for s in os.environ.get("BENCH_SYNC_STEPS", "").split(",") if s.strip()}
    cuda = torch.cuda.is_available()

    def hook(optimizer, args, kwargs) -> None:
        if cuda and len(stamps) + 1 in sync_at:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(hook)
    path = f"{out}.rank{os.environ.get('RANK', '0')}.json"

    def write() -> None:
        with open(path, "w") as f:
            json.dump({"start": START, "stamps": stamps}, f)

    atexit.register(write)
    return stamps


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__.splitlines()[0])
    out, module, *args = sys.argv[1:]
    install(out)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
