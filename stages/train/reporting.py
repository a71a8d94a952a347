"""`--report-to tensorboard,wandb` (and `--tensorboard DIR`): scalars to TensorBoard and wandb.

TensorBoard events end up in `{run}/tensorboard/` in the run's store. On a local root the writer
writes there directly; on an object store (no appends) it writes to a local folder whose files are
uploaded whole at every checkpoint and at the end, so the store holds at most one save interval
less than the pod. wandb is its own client (`WANDB_MODE=offline` writes a local run folder).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from stages.common import storage
from stages.common.config import to_dict
from stages.train.openclip_flags import report_targets

log = logging.getLogger(__name__)


class Reporters:
    def __init__(self, cfg: Any):
        self.writers: list[Any] = []
        self.upload: tuple[Path, str] | None = None
        self.wandb = None
        targets = report_targets(cfg.report_to)
        if cfg.tensorboard:
            self.writers.append(_summary_writer(cfg.tensorboard))
        if "tensorboard" in targets:
            remote = storage.join(cfg.run_dir, "tensorboard")
            if storage.is_local(remote):
                local = Path(remote.removeprefix("file://"))
            else:
                local = Path(tempfile.mkdtemp(prefix="clipforge-tb-"))
                self.upload = (local, remote)
            self.writers.append(_summary_writer(str(local)))
            log.info("TensorBoard events -> %s", remote)
        if "wandb" in targets:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project_name, name=cfg.run_id, id=cfg.run_id,
                                    notes=cfg.wandb_notes or None, tags=[], config=to_dict(cfg),
                                    resume="auto" if cfg.resume == "latest" else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for writer in self.writers:
            for name, value in values.items():
                writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({**values, "step": step}, step=step)

    def sync(self) -> None:
        """Flush the writers and copy the event files to the run's store."""
        for writer in self.writers:
            writer.flush()
        if self.upload is not None:
            local, remote = self.upload
            for path in local.rglob("*"):
                if path.is_file():
                    storage.write_bytes(storage.join(remote, str(path.relative_to(local))), path.read_bytes())

    def close(self) -> None:
        self.sync()
        for writer in self.writers:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _summary_writer(folder: str):
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(folder, exist_ok=True)
    return SummaryWriter(folder)
