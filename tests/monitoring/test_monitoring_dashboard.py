"""The Grafana dashboard JSON is importable: valid structure, unique ids, a query on every panel."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO

DASHBOARD = json.loads((REPO / "monitoring" / "grafana" / "clipforge.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval"}


def test_dashboard_has_the_fields_grafana_import_needs():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and isinstance(DASHBOARD["schemaVersion"], int)
    assert "id" not in DASHBOARD or DASHBOARD["id"] is None  # import assigns its own id


def test_panel_ids_are_unique_and_panels_do_not_overlap():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_every_panel_has_a_query_using_only_known_variables(panel):
    assert panel["targets"], panel["title"]
    for target in panel["targets"]:
        assert target["expr"].strip() and target["refId"]
        used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
        assert used <= set(VARIABLES) | GRAFANA_BUILTINS, (panel["title"], used)
    assert panel["datasource"]["uid"] == "${datasource}"


def test_variables_for_namespace_run_and_job():
    assert {"namespace", "run", "job"} <= set(VARIABLES)
    assert VARIABLES["datasource"]["query"] == "prometheus"


def test_issue_panels_are_present():
    titles = {p["title"] for p in PANELS}
    exprs = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    for title in ["Samples/s (total)", "Samples/s per GPU", "MFU", "Loss", "Learning rate", "Logit scale",
                  "Data-wait fraction", "Step time p50 / p95", "Checkpoint age", "Non-finite steps",
                  "Job restarts", "GPU utilisation", "GPU memory used", "Download success rate",
                  "Download images/s", "Eval metrics per dataset"]:
        assert title in titles
    for metric in ["training_operator_jobs_restarted_total", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"]:
        assert metric in exprs
