"""Options of the export stage."""

from __future__ import annotations

import dataclasses
import os
import re

from stages.common.config import CommonConfig
from stages.common.errors import ConfigError

DTYPES = ("fp32", "fp16", "bf16")
_REPO_ID = re.compile(r"^([\w.-]+/)?[\w.-]+$")


@dataclasses.dataclass
class ExportConfig(CommonConfig):
    """Export a checkpoint in open_clip's Hub layout (config, safetensors, model card); optionally push it."""

    checkpoint: str = dataclasses.field(default="", metadata={
        "help": "checkpoint to export: a step_<N>.pt file, a sharded step_<N>/ folder, a LATEST pointer, "
                "a checkpoints/ or run folder "
                "(default: the run folder {root}/{run_id})"})
    output: str = dataclasses.field(default="", metadata={
        "help": "folder to write the export to, any fsspec URI (default: {run}/export)"})
    dtype: str = dataclasses.field(default="fp32", metadata={
        "choices": list(DTYPES), "help": "dtype of the floating-point weights in the safetensors file"})
    push_to_hub: str = dataclasses.field(default="", metadata={
        "help": "Hugging Face Hub repo id (user/name) to push to; the token comes from $HF_TOKEN"})
    private: bool = dataclasses.field(default=False, metadata={
        "help": "create the Hub repo private (when it does not exist yet)"})
    commit_message: str = dataclasses.field(default="Add clipforge open_clip model", metadata={
        "help": "commit message of the Hub upload"})
    dry_run: bool = dataclasses.field(default=False, metadata={
        "help": "write the export but only list what --push-to-hub would upload"})
    license: str = dataclasses.field(default="apache-2.0", metadata={
        "help": "license in the model card's front matter"})
    datasets: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "Hub dataset ids for the model card's front matter"})
    tags: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "extra tags for the model card (clip, open_clip and clipforge are always there)"})

    def validate(self) -> None:
        if self.push_to_hub and not _REPO_ID.match(self.push_to_hub):
            raise ConfigError(f"--push-to-hub {self.push_to_hub!r} is not a Hub repo id (name or owner/name)")
        if self.push_to_hub and not self.dry_run and not hf_token():
            raise ConfigError("--push-to-hub needs a Hugging Face token in $HF_TOKEN (a write token from "
                              "https://huggingface.co/settings/tokens), or --dry-run to only list the files")
        if (self.private or self.dry_run) and not self.push_to_hub:
            raise ConfigError("--private and --dry-run apply to --push-to-hub, which is not given")

    @property
    def source_run_dir(self) -> str:
        """The run the checkpoint belongs to (its card data and run.json live there)."""
        ckpt = self.checkpoint.rstrip("/")
        if not ckpt:
            return self.run_dir
        head, sep, _ = ckpt.rpartition("/checkpoints")
        if sep and head:
            return head  # {run}/checkpoints, {run}/checkpoints/LATEST or .../step_<N>.pt
        return self.run_dir if ckpt.endswith((".pt", "LATEST")) else ckpt

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint or self.run_dir

    @property
    def output_uri(self) -> str:
        return (self.output or f"{self.source_run_dir}/export").rstrip("/")


def hf_token() -> str:
    return os.environ.get("HF_TOKEN", "").strip()
