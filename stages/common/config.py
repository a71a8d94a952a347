"""Stage configs: one dataclass per stage, filled from defaults, then a YAML file, then flags.

Flags are the field names with dashes (`batch_size` -> `--batch-size`), so a field named after an
`open_clip_train` concept keeps its flag. Field metadata may carry `help`, `choices`, `flag`
(extra aliases) and `nargs`. A config class may define `validate()`, which runs before any work;
`--check-config` validates and prints the resolved config without running the stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import yaml

from stages.common.errors import ConfigError

C = TypeVar("C")


def new_run_id() -> str:
    """A sortable, unique-enough run id: UTC time plus a short host-derived suffix."""
    suffix = f"{abs(hash((socket.gethostname(), os.getpid(), time.time_ns()))) % 0xFFFF:04x}"
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + suffix


@dataclasses.dataclass
class CommonConfig:
    """Options every stage shares: where the run lives, logging and metrics."""

    root: str = dataclasses.field(default="./runs", metadata={
        "help": "storage root (any fsspec URI: s3://bucket/prefix, gs://..., a local path); "
                "the run lives at {root}/{run_id}"})
    run_id: str = dataclasses.field(default="", metadata={
        "help": "run id; default: a new one from the current time"})
    log_level: str = dataclasses.field(default="INFO", metadata={
        "choices": ["DEBUG", "INFO", "WARNING", "ERROR"], "help": "log level"})
    metrics_port: int = dataclasses.field(default=0, metadata={
        "help": "serve Prometheus metrics on this port while running (0: off)"})
    metrics_addr: str = dataclasses.field(default="127.0.0.1", metadata={
        "help": "address the metrics server binds (0.0.0.0 in a pod)"})
    pushgateway: str = dataclasses.field(default="", metadata={
        "help": "Prometheus Pushgateway URL to push final metrics to (default: $PUSHGATEWAY_URL)"})

    @property
    def run_dir(self) -> str:
        return f"{self.root.rstrip('/')}/{self.run_id}"

    def validate_common(self) -> None:
        if not self.root:
            raise ConfigError("--root is empty: give a storage root such as ./runs or s3://bucket/runs")
        if "/" in self.run_id or " " in self.run_id:
            raise ConfigError(f"--run-id {self.run_id!r} must not contain '/' or spaces")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port {self.metrics_port} is not a port number (0-65535)")


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, tp: Any) -> None:
    meta = dict(field.metadata)
    flags = [f"--{field.name.replace('_', '-')}", *meta.get("flag", [])]
    kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS,
                              "help": meta.get("help", "")}
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    if default not in (None, "", [], ()):
        kwargs["help"] += f" (default: {default})"
    tp = _unwrap_optional(tp)
    if tp is bool:  # a negative name (no_set_device_rank) gets no --no-no-... twin, whose sense would flip
        kwargs["action"] = "store_true" if field.name.startswith("no_") else argparse.BooleanOptionalAction
    elif typing.get_origin(tp) in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        kwargs.update(type=item, nargs=meta.get("nargs", "+"))
    else:
        kwargs["type"] = tp if tp in (int, float, str) else str
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
    parser.add_argument(*flags, **kwargs)


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__)
    parser.add_argument("--config", help="YAML file with the options (keys as the flags, "
                                         "dashes or underscores); flags override it")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the options, print the resolved config as JSON, and exit")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.init:
            _add_field(parser, field, hints[field.name])
    return parser


def _load_yaml(path: str, cls: type, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from stages.common import storage  # storage needs fsspec; config alone should not

    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"--config {path}: cannot read it: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[name] = _coerce(f"--config {path}: {key}", actions[name], value)
    return out


def _coerce(where: str, action: argparse.Action, value: Any) -> Any:
    """A YAML value through the flag's own conversion and choices (YAML 1.1 reads 1e-3 as a string)."""
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} is not true or false")
    convert = action.type or str
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(where, convert, action.choices, v) for v in items]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: {value!r} is not a single value")
    return _convert_one(where, convert, action.choices, value)


_KINDS = {int: "an integer", float: "a number", str: "a string"}


def _convert_one(where: str, convert: Callable, choices: Any, value: Any) -> Any:
    kind = _KINDS.get(convert, "a valid value")
    if isinstance(value, bool) and convert is not str:
        raise ConfigError(f"{where}: {value!r} is not {kind}")
    try:
        out = convert(str(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not {kind}") from None
    if choices is not None and out not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return out


def parse_config(cls: type[C], argv: Sequence[str] | None, prog: str) -> tuple[C, bool]:
    """Build a config from defaults < YAML (--config) < flags; returns (config, check_only)."""
    parser = build_parser(cls, prog)
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config", None)
    check_only = ns.pop("check_config", False)
    values = _load_yaml(config_path, cls, parser) if config_path else {}
    values.update(ns)
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid options: {exc}") from exc
    if isinstance(cfg, CommonConfig):
        if not cfg.run_id:
            cfg.run_id = new_run_id()
        if not cfg.pushgateway:
            cfg.pushgateway = os.environ.get("PUSHGATEWAY_URL", "")
        cfg.validate_common()
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg, check_only


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def print_config(cfg: Any) -> None:
    json.dump(to_dict(cfg), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
