"""Options of the evaluate stage."""

from __future__ import annotations

import dataclasses

from stages.common.config import CommonConfig
from stages.common.errors import ConfigError


@dataclasses.dataclass
class EvaluateConfig(CommonConfig):
    """Zero-shot classification and image-text retrieval of a checkpoint on eval sets in any store."""

    checkpoint: str = dataclasses.field(default="", metadata={
        "help": "model to evaluate: a step_<N>.pt file, a LATEST pointer, a checkpoints/ or run folder, "
                "or an exported open_clip folder (default: the run folder {root}/{run_id})"})
    eval_data: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "eval sets in CLIP_benchmark wds layout, as URI or NAME=URI (name defaults to the "
                "folder name); any fsspec store"})
    val_data: str = dataclasses.field(default="", metadata={
        "help": "the download stage's manifest.json (or its data/ or run folder): image-caption "
                "retrieval on its val split, reported as dataset 'val'"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "images per batch"})
    max_samples: int | None = dataclasses.field(default=None, metadata={
        "help": "evaluate at most this many samples of each eval set (all ranks together)"})
    max_image_pixels: int = dataclasses.field(default=0, metadata={
        "help": "images with more pixels are not decoded (0: PIL's limit)"})
    workers: int = dataclasses.field(default=2, metadata={
        "help": "DataLoader worker processes per rank (0: load in the main process)"})
    precision: str = dataclasses.field(default="amp", metadata={
        "choices": ["amp", "amp_bf16", "fp32"],
        "help": "amp/amp_bf16: autocast on GPU (the CPU always runs fp32)"})
    device: str = dataclasses.field(default="", metadata={
        "help": "torch device (default: cuda:<LOCAL_RANK> when a GPU is there, else cpu)"})
    output: str = dataclasses.field(default="", metadata={
        "help": "where results.json goes (default: {root}/{run_id}/eval/results.json)"})

    def validate(self) -> None:
        if not self.eval_data and not self.val_data:
            raise ConfigError("nothing to evaluate: give --eval-data URI [URI ...] and/or --val-data URI")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size {self.batch_size} must be positive")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max-samples {self.max_samples} must be at least 1")
        if self.max_image_pixels < 0:
            raise ConfigError(f"--max-image-pixels {self.max_image_pixels} must not be negative")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be 0 or more")
        names = [name for name, _ in self.eval_specs()]
        if self.val_data:
            names.append("val")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"--eval-data: dataset name(s) {dupes} given twice; name them NAME=URI")

    def check_inputs(self) -> None:
        """Open every eval set and read its first samples (what --check-config adds to validate)."""
        from stages.evaluate.runner import open_inputs

        open_inputs(self)

    def eval_specs(self) -> list[tuple[str, str]]:
        """(name, uri) of every --eval-data entry."""
        return [parse_spec(spec) for spec in self.eval_data]

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint or self.run_dir

    @property
    def results_uri(self) -> str:
        return self.output or f"{self.run_dir}/eval/results.json"


def parse_spec(spec: str) -> tuple[str, str]:
    """`NAME=URI` or `URI` (the name is then the URI's last folder name)."""
    name, sep, uri = spec.partition("=")
    if not sep or "/" in name or ":" in name:
        name, uri = "", spec
    uri = uri.strip()
    if not uri:
        raise ConfigError(f"--eval-data {spec!r}: no URI")
    name = name.strip() or uri.rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise ConfigError(f"--eval-data {spec!r}: cannot derive a dataset name; use NAME=URI")
    return name, uri
