"""Talk to a real Prometheus over its HTTP API, and fill in the dashboard's variables like Grafana."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request

LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$", re.S)


def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # Prometheus answers bad queries with 400 and a JSON error
        body = json.load(exc)
    assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
    return body["data"]


def query_range(base: str, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
    return api(base, "query_range", query=expr, start=start, end=end, step=step)["result"]


def substitute(text: str, values: dict[str, str]) -> str:
    """Grafana's $var / ${var} substitution (longest names first, so $run does not eat $runs)."""
    for name in sorted(values, key=len, reverse=True):
        text = text.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return text


def variable_values(base: str, query: str, filled: dict[str, str], start: float, end: float) -> list[str]:
    """What Grafana offers for a `label_values(selector, label)` variable."""
    match = LABEL_VALUES.match(substitute(query, filled).strip())
    assert match, f"unsupported variable query {query!r}"
    return api(base, f"label/{match['label']}/values", **{"match[]": match["selector"]},
               start=start, end=end)
