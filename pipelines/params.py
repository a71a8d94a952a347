"""Command-line flags for the pipeline's parameters, read off the built pipeline's inputs."""

from __future__ import annotations

import argparse
import functools

_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}


@functools.cache
def pipeline_inputs() -> dict[str, tuple[type, object, str]]:
    """name -> (type, default, description) of each pipeline parameter, in signature order."""
    from pipelines.pipeline import build_pipeline

    return {name: (_TYPES[spec.type], spec.default, spec.description or "")
            for name, spec in build_pipeline().component_spec.inputs.items()}


def pipeline_defaults() -> dict:
    return {name: default for name, (_, default, _) in pipeline_inputs().items()}


def add_param_flags(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per parameter (`steps` -> `--steps`); only the flags given end up in the namespace.
    `defaults` replaces the shown default of some parameters (the local runner's demo values)."""
    group = parser.add_argument_group("pipeline parameters")
    for name, (kind, default, description) in pipeline_inputs().items():
        shown = (defaults or {}).get(name, default)
        flag = "--" + name.replace("_", "-")
        kwargs = {"dest": f"param_{name}", "default": argparse.SUPPRESS, "metavar": name.upper(),
                  "help": f"{description} (default: {shown!r})" if description else f"(default: {shown!r})"}
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(flag, type=kind, **kwargs)


def given_params(ns: argparse.Namespace) -> dict:
    return {key.removeprefix("param_"): value for key, value in vars(ns).items() if key.startswith("param_")}
