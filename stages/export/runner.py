"""The export stage: checkpoint -> open_clip Hub layout + model card -> any store -> maybe the Hub."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from stages.common import config as config_mod
from stages.common import runinfo, storage
from stages.common.logs import setup_logging
from stages.common.metrics import StageMetrics
from stages.common.redact import redact_text
from stages.export import card, hub, weights
from stages.export.config import ExportConfig, hf_token


def _read_optional(uri: str) -> dict[str, Any] | None:
    return storage.read_json(uri) if storage.exists(uri) else None


def write_card(folder: str, cfg: ExportConfig, model, model_cfg: dict, ckpt: dict) -> None:
    run_dir = cfg.source_run_dir
    model_name = ckpt.get("model_name") or "model"
    text = card.model_card(
        title=cfg.push_to_hub.rsplit("/", 1)[-1] if cfg.push_to_hub else f"clipforge {model_name}",
        repo_id=cfg.push_to_hub, hub_config=weights.hub_config(model, model_cfg, ckpt), ckpt=ckpt,
        manifest=_read_optional(storage.join(run_dir, "data", "manifest.json")),
        run=_read_optional(storage.join(run_dir, runinfo.RUN_FILE)),
        results=_read_optional(storage.join(run_dir, "eval", "results.json")),
        license_=cfg.license, tags=cfg.tags, datasets=cfg.datasets)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(redact_text(text))  # public: no credentials, presigned queries or internal hosts


def publish(folder: str, output: str) -> list[str]:
    """Copy the export files to the output URI (each file atomically); returns their URIs."""
    uris = []
    for path, _ in hub.listing(folder):
        uri = storage.join(output, path)
        storage.upload_file(os.path.join(folder, path), uri)
        uris.append(uri)
    return uris


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    started = time.time()
    log = setup_logging("export", cfg.run_id, 0, cfg.log_level)
    metrics = StageMetrics("export", cfg.run_id, const_labels={"run_id": cfg.run_id})
    size = metrics.gauge("bytes", "Bytes of the exported files")
    pushes = metrics.counter("pushes_total", "Pushes to the Hugging Face Hub")
    metrics.serve(cfg.metrics_port, cfg.metrics_addr)
    try:
        model, ckpt, model_cfg = weights.load_checkpoint_model(cfg.checkpoint_uri)
        log.info("exporting %s (step %s) as %s", ckpt["uri"], ckpt.get("step"), cfg.dtype)
        outputs: dict[str, Any] = {"export": cfg.output_uri}
        with tempfile.TemporaryDirectory(prefix="clipforge-export-") as folder:
            weights.write_layout(folder, model, model_cfg, ckpt, cfg.dtype)
            write_card(folder, cfg, model, model_cfg, ckpt)
            outputs["files"] = publish(folder, cfg.output_uri)
            outputs["bytes"] = sum(s for _, s in hub.listing(folder))
            size.set(outputs["bytes"])
            print(f"export: {cfg.output_uri}", *(f"  {u}" for u in outputs["files"]), sep="\n", flush=True)
            if cfg.push_to_hub and cfg.dry_run:
                print(hub.describe_dry_run(folder, cfg.push_to_hub, cfg.private, cfg.commit_message,
                                           bool(hf_token())), flush=True)
            elif cfg.push_to_hub:
                outputs["commit_url"] = hub.push(folder, cfg.push_to_hub, hf_token(), cfg.private,
                                                 cfg.commit_message)
                pushes.inc()
                print(f"pushed: {outputs['commit_url']}", flush=True)
        runinfo.record_stage(cfg.source_run_dir, "export", config=_public_config(cfg),
                             inputs={"checkpoint": ckpt["uri"]}, outputs=outputs, started=started,
                             packages=("torch", "open_clip_torch", "safetensors", "huggingface_hub"))
        metrics.mark_success()
        metrics.push(cfg.pushgateway)
        return outputs
    finally:
        metrics.stop()


def _public_config(cfg: ExportConfig) -> dict[str, Any]:
    # The token never enters the config (it is read from the environment), so the config is safe to record.
    return config_mod.to_dict(cfg)
