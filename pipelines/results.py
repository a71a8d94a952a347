"""What a finished run shows its user: the eval results as a table and where the export went."""

import json

import fsspec


def read_json(uri: str) -> dict:
    with fsspec.open(uri, "r") as f:
        return json.load(f)


def eval_table(results: dict) -> str:
    """One row per dataset and metric of results.json (docs/CONTRACTS.md)."""
    rows = [("dataset", "task", "samples", "metric", "value")]
    for name, res in results.get("datasets", {}).items():
        for metric, value in res.get("metrics", {}).items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append((name, str(res.get("task", "")), str(res.get("samples", "")), metric, shown))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def export_listing(export_uri: str) -> str:
    fs, path = fsspec.core.url_to_fs(export_uri)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return f"export: {export_uri}\n" + "\n".join(f"  {name}" for name in names)


def numeric_metrics(results: dict) -> dict[str, float]:
    """`dataset/metric` -> value for every number in results.json (the KFP run's Metrics)."""
    out = {}
    for name, res in results.get("datasets", {}).items():
        for metric, value in res.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{name}/{metric}"] = float(value)
    return out


def eval_markdown(results: dict) -> str:
    """The eval table as Markdown, for the KFP UI's visualization of the run."""
    rows = [[name, str(res.get("task", "")), str(res.get("samples", "")), metric,
             f"{value:.4f}" if isinstance(value, float) else str(value)]
            for name, res in results.get("datasets", {}).items() for metric, value in res.get("metrics", {}).items()]
    lines = ["| dataset | task | samples | metric | value |", "| --- | --- | --- | --- | ---: |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "## Evaluation\n\n" + "\n".join(lines) + "\n"


def model_metadata(export_uri: str, checkpoint: str, hub_repo: str = "") -> dict:
    """What the Model artifact tells the KFP UI: the folder, its files, the model and where it came from."""
    fs, path = fsspec.core.url_to_fs(export_uri)
    config = json.loads(fs.cat(f"{path}/open_clip_config.json"))
    meta = {"framework": "open_clip", "export_uri": export_uri, "checkpoint": checkpoint,
            "files": sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)),
            "embed_dim": config.get("model_cfg", {}).get("embed_dim")}
    if hub_repo:
        meta["hub_repo"] = hub_repo
    return meta
