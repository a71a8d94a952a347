"""Options of the evaluate stage."""

from __future__ import annotations

import dataclasses

from stages.common.config import CommonConfig
from stages.common.errors import ConfigError


@dataclasses.dataclass
class EvaluateConfig(CommonConfig):
    """Zero-shot classification and image-text retrieval of a checkpoint on eval sets in any store."""

    checkpoint: str = dataclasses.field(default="", metadata={
        "help": "model to evaluate: a step_<N>.pt file, a sharded step_<N>/ folder, a LATEST pointer, a "
                "checkpoints/ or run folder, "
                "or an exported open_clip folder (default: the run folder {root}/{run_id})"})
    eval_data: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "eval sets in CLIP_benchmark wds layout, as URI or NAME=URI (name defaults to the "
                "folder name); any fsspec store"})
    val_data: str = dataclasses.field(default="", metadata={
        "help": "the download stage's manifest.json (or its data/ or run folder): image-caption "
                "retrieval on its val split, reported as dataset 'val'"})
    model: str = dataclasses.field(default="", metadata={
        "help": "evaluate a stock open_clip model instead of --checkpoint: its name (with --pretrained), "
                "or hf-hub:ORG/REPO / local-dir:PATH"})
    pretrained: str = dataclasses.field(default="", metadata={
        "help": "with --model NAME: an open_clip pretrained tag (see open_clip.list_pretrained()), "
                "hf-hub:ORG/REPO, or a weights file / open_clip_train checkpoint path"})
    linear_probe_data: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "sets (URI or NAME=URI, CLIP_benchmark wds layout with train/ and test/) scored by a "
                "linear probe on frozen image features, as CLIP_benchmark's linear_probe task"})
    fewshot_k: int = dataclasses.field(default=-1, metadata={
        "help": "linear probe: train samples per class (-1: all), as CLIP_benchmark's --fewshot_k"})
    fewshot_epochs: int = dataclasses.field(default=10, metadata={"help": "linear probe: epochs"})
    fewshot_lr: float = dataclasses.field(default=0.1, metadata={"help": "linear probe: learning rate"})
    seed: int = dataclasses.field(default=0, metadata={"help": "linear probe: random seed"})
    suite: str = dataclasses.field(default="", metadata={
        "choices": ["", "datacomp"],
        "help": "run a task suite: 'datacomp' runs DataComp's 38 tasks on the sets under --suite-root"})
    suite_root: str = dataclasses.field(default="", metadata={
        "help": "folder (any store) holding the suite's sets in CLIP_benchmark wds layout, named as "
                "DataComp downloads them (wds_<task>_test, e.g. wds_vtab-cifar100_test)"})
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
        if not (self.eval_data or self.val_data or self.linear_probe_data or self.suite):
            raise ConfigError("nothing to evaluate: give --eval-data URI [URI ...], --linear-probe-data, "
                              "--val-data URI and/or --suite datacomp --suite-root URI")
        if bool(self.suite) != bool(self.suite_root):
            raise ConfigError("--suite and --suite-root go together: --suite datacomp --suite-root URI")
        if self.model and self.checkpoint:
            raise ConfigError(f"--model {self.model!r} and --checkpoint {self.checkpoint!r}: give one")
        if self.pretrained and not self.model:
            raise ConfigError(f"--pretrained {self.pretrained!r} needs --model NAME")
        if self.fewshot_epochs < 1 or self.fewshot_lr <= 0 or self.fewshot_k == 0:
            raise ConfigError(f"--fewshot-epochs {self.fewshot_epochs} must be >= 1, --fewshot-lr "
                              f"{self.fewshot_lr} > 0 and --fewshot-k {self.fewshot_k} -1 or >= 1")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size {self.batch_size} must be positive")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max-samples {self.max_samples} must be at least 1")
        if self.max_image_pixels < 0:
            raise ConfigError(f"--max-image-pixels {self.max_image_pixels} must not be negative")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be 0 or more")
        names = [name for name, _ in self.eval_specs() + self.linear_probe_specs()]
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

    def linear_probe_specs(self) -> list[tuple[str, str]]:
        return [parse_spec(spec) for spec in self.linear_probe_data]

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
