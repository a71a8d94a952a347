"""The command line of each stage, built in one place for the pipeline's steps and for `k8s/`.

A step hands its stage options over as a dict keyed by the stage's own flag names (`batch_size`
-> `--batch-size`), so a new pass-through option is one more entry in the pipeline function and
nothing here. `flags()` is the only mapping from values to argv: `None` and `""` are left out (the
stage default applies), `True` is a bare flag, `False` is left out.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping


def plain(value):
    """A value as the step received it inside a dict input: kfp substitutes pipeline parameters
    into a dict as text (`"true"`, `"300.0"`), so booleans and whole numbers are read back here."""
    if isinstance(value, str):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        if re.fullmatch(r"-?[0-9]+(\.0+)?", value):
            return int(float(value))
    return value


def flags(options: Mapping) -> list[str]:
    out: list[str] = []
    for name, value in options.items():
        value = plain(value)
        if value is None or value == "" or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, _number(value)]
    return out


def _number(value) -> str:
    """kfp passes integers through JSON as floats (`3.0`); the stages' parsers want `3`."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def extra(extra_args: str) -> list[str]:
    return shlex.split(extra_args or "")


def run_dir(root: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/{run_id}"


def download_argv(root: str, run_id: str, options: Mapping, extra_args: str = "",
                  num_parts: int = 1, part_index: int | str | None = None) -> list[str]:
    """`--image-size 0` and the demo's sample count without `--demo` mean the stage default."""
    opts = {k: plain(v) for k, v in options.items()}
    if not opts.get("image_size"):
        opts.pop("image_size", None)
    if not opts.get("demo"):
        opts.pop("demo_samples", None)
    else:
        opts.pop("url_list", None)
    parts = {"num_parts": num_parts, "part_index": part_index} if plain(str(num_parts)) > 1 else {}
    return ["--root", root, "--run-id", run_id, *flags(opts), *flags(parts), *extra(extra_args)]


def merge_argv(root: str, run_id: str, num_parts: int) -> list[str]:
    return ["--root", root, "--run-id", run_id, "--merge-parts", _number(num_parts)]


def train_argv(root: str, run_id: str, train_data: str, options: Mapping, extra_args: str = "") -> list[str]:
    """`steps` > 0 wins over `epochs`; every run resumes from its LATEST checkpoint when there is one."""
    opts = {k: plain(v) for k, v in options.items()}
    if float(opts.get("steps") or 0) > 0:
        opts.pop("epochs", None)
    else:
        opts.pop("steps", None)
    return ["--root", root, "--run-id", run_id, "--train-data", train_data, *flags(opts),
            "--resume", "latest", *extra(extra_args)]


def evaluate_argv(root: str, run_id: str, checkpoint: str, eval_sets: list[str], val_data: str,
                  options: Mapping, extra_args: str = "") -> list[str]:
    return ["--root", root, "--run-id", run_id, "--checkpoint", checkpoint,
            "--output", f"{run_dir(root, run_id)}/eval/results.json",
            *flags({"eval_data": list(eval_sets) or None, "val_data": val_data, **options}),
            *extra(extra_args)]


def export_argv(root: str, run_id: str, checkpoint: str, options: Mapping, extra_args: str = "") -> list[str]:
    return ["--root", root, "--run-id", run_id, "--checkpoint", checkpoint,
            "--output", f"{run_dir(root, run_id)}/export", *flags(options), *extra(extra_args)]
