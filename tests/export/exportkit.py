"""Export test helpers: a micro CLIP saved as a run's checkpoint, with eval results and a manifest."""

from __future__ import annotations

import open_clip
import torch

from stages.common import checkpoints, storage
from stages.common.models import register_builtin_configs

TRAIN_CONFIG = {"model": "clipforge-micro", "lr": 0.003, "batch_size": 6, "precision": "amp"}


def micro_model(seed: int = 3) -> torch.nn.Module:
    register_builtin_configs()
    torch.manual_seed(seed)
    return open_clip.create_model("clipforge-micro").eval()


def save_run(model: torch.nn.Module, run_dir: str, step: int = 40) -> None:
    """checkpoints/step_<N>.pt + LATEST, eval/results.json and data/manifest.json as the stages write them."""
    checkpoints.save(storage.join(run_dir, "checkpoints"), step, {
        "model": model.state_dict(), "model_name": "clipforge-micro",
        "model_cfg": open_clip.get_model_config("clipforge-micro"),
        "preprocess_cfg": dict(model.visual.preprocess_cfg), "epoch": 1, "samples_seen": 240,
        "config": TRAIN_CONFIG})
    storage.write_json(storage.join(run_dir, "eval", "results.json"), {
        "format": "clipforge.eval/1", "datasets": {"demo": {
            "task": "zeroshot_classification", "samples": 60,
            "metrics": {"acc1": 0.875, "acc5": 1.0, "mean_per_class_recall": 0.86}}}})
    storage.write_json(storage.join(run_dir, "data", "manifest.json"), {
        "format": "clipforge.manifest/1", "input": "s3://bucket/urls.parquet", "total_samples": 1100,
        "attempted": 1200, "success_rate": 0.916,
        "splits": {"train": {"shards": ["a.tar", "b.tar"], "samples": 1000},
                   "val": {"shards": ["c.tar"], "samples": 100}}})


def embeddings(model, preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images = torch.stack([preprocess(Image.new("RGB", (40, 30), colour))
                          for colour in ((200, 30, 30), (20, 20, 220), (240, 240, 240))])
    texts = tokenizer(["a red square", "a blue thing", "white"])
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)
