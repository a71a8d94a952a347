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
