"""A real run watched by real servers: download, a two-process training and an evaluation report to
the Prometheus and Pushgateway of `make monitor`; every dashboard panel's query returns data."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from monkit_prom import api, query_range, substitute, variable_values
from test_monitoring_local import start_monitor, stop_monitor

from tests.conftest import REPO, free_port

RUN = "mon1"
DASHBOARD = json.loads((REPO / "monitoring" / "grafana" / "clipforge.json").read_text())
EXTERNAL = ("DCGM_FI_", "training_operator_")  # exporters of GPU nodes and the training operator


def free_port_pair() -> int:
    """A port P with P+1 also free: the trainer's local rank r serves P + r."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def run_stage(cmd: list[str], env: dict, log, timeout: int = 240) -> None:
    with log.open("wb") as out:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    assert rc == 0, f"{' '.join(cmd[:4])} failed:\n{log.read_text()[-3000:]}"


def run_pipeline(root, train_port: int, gateway: str, env: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    common = ["--root", str(root), "--run-id", RUN, "--pushgateway", gateway]
    run_stage([sys.executable, "-m", "stages.cli", "download", "--demo", "--demo-samples", "200",
               "--demo-eval-samples", "60", *common], env, root / "download.log")
    run_stage([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stages.train", *common, "--train-data", str(root / RUN / "data" / "manifest.json"),
               "--model", "clipforge-micro", "--batch-size", "8", "--warmup", "2", "--lr", "1e-3",
               "--workers", "1", "--val-data", "none", "--steps", "40", "--save-every-steps", "10",
               "--peak-flops", "1e11", "--metrics-port", str(train_port)], env, root / "train.log")
    run_stage([sys.executable, "-m", "stages.cli", "evaluate", *common,
               "--eval-data", str(root / RUN / "evalsets" / "demo"), "--batch-size", "32", "--workers", "0"],
              env, root / "evaluate.log")


def wait_for_series(base: str, expr: str, start: float, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not query_range(base, expr, start, time.time()):
        assert time.monotonic() < deadline, f"Prometheus never had {expr}"
        time.sleep(0.5)


def fill_variables(base: str, start: float, end: float) -> dict[str, str]:
    """Resolve namespace, run and job from Prometheus as Grafana would, picking this run's values."""
    wanted = {"namespace": "local", "run": RUN, "job": "clipforge-train"}
    filled = {"__rate_interval": "5s", "__interval": "1s", "__range": f"{int(end - start)}s"}
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        offered = variable_values(base, var["query"]["query"], filled, start, end)
        assert wanted[var["name"]] in offered, (var["name"], offered)
        filled[var["name"]] = wanted[var["name"]]
    return filled


def panel_targets():
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


@pytest.mark.slow
def test_every_dashboard_panel_returns_data_from_a_real_run(tmp_path, cli_env):
    env = {**cli_env, "OMP_NUM_THREADS": "1", "CLIPFORGE_DIST_TIMEOUT_S": "120"}
    prom, push, train_port = free_port(), free_port(), free_port_pair()
    base, gateway = f"http://127.0.0.1:{prom}", f"http://127.0.0.1:{push}"
    monitor, log = start_monitor(tmp_path / "mon", prom, push, f"{train_port}-{train_port + 1}", env)
    try:
        start = time.time()
        run_pipeline(tmp_path / "runs", train_port, gateway, env)
        wait_for_series(base, f'clipforge_evaluate_metric{{run_id="{RUN}"}}', start)
        end = time.time()

        # both ranks were scraped while training
        for rank_port in (train_port, train_port + 1):
            up = query_range(base, f'up{{job="clipforge-train", instance="127.0.0.1:{rank_port}"}} == 1', start, end)
            assert up, f"the trainer's rank on port {rank_port} was never scraped"
        ranks = query_range(base, f'count by (rank) (clipforge_train_step{{job="clipforge-train", run_id="{RUN}"}})',
                            start, end)
        assert {r["metric"]["rank"] for r in ranks} == {"0", "1"}

        values = fill_variables(base, start, end)
        empty = []
        for title, expr in panel_targets():
            result = query_range(base, substitute(expr, values), start, end)  # asserts Prometheus accepts it
            if not result and not any(name in expr for name in EXTERNAL):
                empty.append(title)
        assert not empty, f"panels without data: {empty}"

        evals = query_range(base, f'clipforge_evaluate_metric{{run_id="{RUN}", dataset="demo", metric="acc1"}}',
                            start, end)
        assert 0 <= float(evals[0]["values"][-1][1]) <= 1

        # the alert rules are loaded and evaluate without errors on these series
        rules = [r for g in api(base, "rules")["groups"] for r in g["rules"]]
        assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), rules
    finally:
        rc = stop_monitor(monitor, [prom, push])
    assert rc == 0, log.read_text()
