"""Command-line flags for the pipeline's parameters, read off `clip_pipeline`'s signature."""

import argparse
import inspect

from pipelines.pipeline import clip_pipeline


def pipeline_defaults() -> dict:
    return {name: p.default for name, p in inspect.signature(clip_pipeline).parameters.items()}


def add_param_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter (`steps` -> `--steps`); only the flags given end up in the namespace."""
    group = parser.add_argument_group("pipeline parameters")
    for name, default in pipeline_defaults().items():
        flag = "--" + name.replace("_", "-")
        kwargs = {"dest": f"param_{name}", "default": argparse.SUPPRESS, "metavar": name.upper(),
                  "help": f"(default: {default!r})"}
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(flag, type=type(default), **kwargs)


def given_params(ns: argparse.Namespace) -> dict:
    return {key.removeprefix("param_"): value for key, value in vars(ns).items() if key.startswith("param_")}
