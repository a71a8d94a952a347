"""The model card (README.md): Hub front matter, configs, data provenance, eval results, usage."""

from __future__ import annotations

import json
from typing import Any

import yaml

BASE_TAGS = ["clip", "open_clip", "clipforge", "zero-shot-image-classification"]


def front_matter(license_: str, tags: list[str], datasets: list[str]) -> str:
    meta = {"library_name": "open_clip", "license": license_,
            "tags": BASE_TAGS + [t for t in tags if t not in BASE_TAGS],
            "pipeline_tag": "zero-shot-image-classification", "datasets": list(datasets)}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_card(*, title: str, repo_id: str, hub_config: dict[str, Any], ckpt: dict[str, Any],
               manifest: dict[str, Any] | None, run: dict[str, Any] | None,
               results: dict[str, Any] | None, license_: str, tags: list[str], datasets: list[str]) -> str:
    sections = [
        front_matter(license_, tags, datasets),
        f"# {title}\n\nA CLIP model (open_clip architecture `{hub_config['clipforge']['model_name']}`) "
        f"trained with clipforge, exported from step {ckpt.get('step')}.\n",
        _usage(repo_id),
        "## Model config\n\n```json\n" + json.dumps(hub_config["model_cfg"], indent=2) + "\n```\n\n"
        "Preprocessing:\n\n```json\n" + json.dumps(hub_config["preprocess_cfg"], indent=2) + "\n```\n",
        _training(ckpt, run),
        _data(manifest, run),
        _evaluation(results),
    ]
    return "\n".join(s for s in sections if s)


def _usage(repo_id: str) -> str:
    source = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    return ("## How to use\n\n```python\nimport open_clip\nimport torch\nfrom PIL import Image\n\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms({source!r})\n"
            f"tokenizer = open_clip.get_tokenizer({source!r})\nmodel.eval()\n\n"
            "image = preprocess(Image.open(\"cat.jpg\")).unsqueeze(0)\n"
            "text = tokenizer([\"a photo of a cat\", \"a photo of a dog\"])\n"
            "with torch.no_grad():\n"
            "    image_features = model.encode_image(image, normalize=True)\n"
            "    text_features = model.encode_text(text, normalize=True)\n"
            "    probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)\n```\n")


def _training(ckpt: dict[str, Any], run: dict[str, Any] | None) -> str:
    facts = {"step": ckpt.get("step"), "epoch": ckpt.get("epoch"), "samples seen": ckpt.get("samples_seen")}
    lines = ["## Training\n"] + [f"- {k}: {v}" for k, v in facts.items() if v is not None]
    train = ((run or {}).get("stages") or {}).get("train") or {}
    if train.get("elapsed_s") is not None:
        lines.append(f"- wall time: {train['elapsed_s']} s")
    config = ckpt.get("config") or train.get("config")
    if config:
        lines += ["", "Training config:", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _data(manifest: dict[str, Any] | None, run: dict[str, Any] | None) -> str:
    download = ((run or {}).get("stages") or {}).get("download") or {}
    if not manifest and not download:
        return ""
    lines = ["## Training data\n"]
    if manifest:
        splits = manifest.get("splits") or {}
        lines += [f"- URL list: `{manifest.get('input', 'unknown')}`",
                  f"- samples: {manifest.get('total_samples')} of {manifest.get('attempted')} attempted "
                  f"(success rate {manifest.get('success_rate')})"]
        lines += [f"- split `{name}`: {split.get('samples')} samples in {len(split.get('shards', []))} shards"
                  for name, split in splits.items()]
    for key, value in (download.get("inputs") or {}).items():
        lines.append(f"- download input `{key}`: `{value}`")
    return "\n".join(lines) + "\n"


def _evaluation(results: dict[str, Any] | None) -> str:
    datasets = (results or {}).get("datasets") or {}
    if not datasets:
        return ""
    lines = ["## Evaluation\n", "| dataset | task | samples | metric | value |", "|---|---|---|---|---|"]
    for name, res in datasets.items():
        task = str(res.get("task", "")).removeprefix("zeroshot_")
        for metric, value in (res.get("metrics") or {}).items():
            lines.append(f"| {name} | {task} | {res.get('samples')} | {metric} | {value:.4f} |")
    return "\n".join(lines) + "\n"
