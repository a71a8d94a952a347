"""What a training launch may be asked to do, checked before anything runs (no cluster client needed)."""

from __future__ import annotations

LAUNCHERS = ("pytorchjob", "local")
CLEANUP_POLICIES = ("always", "on-success", "never")
# A job of the same run already exists: follow it when it runs, replace it when it has finished
# (the new job resumes from LATEST), always replace it, or refuse.
EXISTING_POLICIES = ("adopt", "replace", "fail")


def check_launch(launcher: str, cleanup: str, on_existing: str) -> None:
    for name, value, allowed in (("launcher", launcher, LAUNCHERS), ("cleanup", cleanup, CLEANUP_POLICIES),
                                 ("on_existing", on_existing, EXISTING_POLICIES)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: one of {', '.join(allowed)}")


def procs_for(gpus_per_node: int, procs_per_node: int) -> int:
    """torchrun processes per node: one per GPU unless given; with GPUs, any other count is an error."""
    gpus, procs = int(gpus_per_node), int(procs_per_node)
    if gpus < 0 or procs < 0:
        raise ValueError(f"gpus_per_node={gpus}, procs_per_node={procs}: neither may be negative")
    if gpus and procs and procs != gpus:
        raise ValueError(f"procs_per_node={procs} but gpus_per_node={gpus}: each process drives one GPU, "
                         "so give the same number or leave procs_per_node at 0")
    return procs or gpus or 1
