"""open_clip_train 3.3.0 as the reference trainer, with only the fixes below (needed for it to run on the pinned dependencies).

    python -m bench.open_clip_train_ref [--model-config JSON ...] [--logs-dir DIR] OPEN_CLIP_TRAIN_FLAGS

then `open_clip_train.main.main(argv)`. What is changed, and nothing else:

1. webdataset >= 0.2.96: `open_clip_train.data.tar_file_expander` gets `eof_value=None`
   (without it every shard fails with `KeyError: 'fname'`).
2. DDP on CPU: open_clip_train passes `device_ids=[device]`, which DDP rejects for a CPU module;
   `torch.nn.parallel.DistributedDataParallel` is called with `device_ids=None` for CPU devices.
3. `torchrun` rejects a `--logs` flag among the script's arguments as ambiguous (its own
   `--logs-specs`), so this wrapper takes `--logs-dir DIR` and hands it on as `--logs DIR`.

`--model-config PATH` (repeatable) registers a JSON model config with `open_clip.add_model_config`,
so a custom model (clipforge-tiny) has the same name here as in clipforge.
"""

from __future__ import annotations

import functools
import sys


def patch() -> None:
    import torch
    import webdataset as wds
    from open_clip_train import data as oc_data

    oc_data.tar_file_expander = functools.partial(wds.tariterators.tar_file_expander, eof_value=None)

    ddp = torch.nn.parallel.DistributedDataParallel
    if getattr(ddp, "_cpu_device_ids_fix", False):
        return

    def cpu_safe_ddp(module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        return ddp(module, device_ids, *args, **kwargs)

    cpu_safe_ddp._cpu_device_ids_fix = True
    torch.nn.parallel.DistributedDataParallel = cpu_safe_ddp


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(model config paths, open_clip_train's argv with --logs-dir turned into --logs)."""
    configs, rest = [], []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("--model-config", "--logs-dir"):
            value = value if eq else next(it)
            if name == "--model-config":
                configs.append(value)
            else:
                rest += ["--logs", value]
        else:
            rest.append(arg)
    return configs, rest


def main(argv: list[str] | None = None):
    configs, argv = split_argv(sys.argv[1:] if argv is None else argv)
    import open_clip
    from open_clip_train import main as oc_main

    for path in configs:
        open_clip.add_model_config(path)
    patch()
    return oc_main.main(argv)


if __name__ == "__main__":
    sys.exit(main())
