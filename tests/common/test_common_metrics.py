"""Metrics: scraped over HTTP while running, pushed to a real Pushgateway at the end."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest

from stages.common.metrics import StageMetrics
from tests.conftest import free_port, wait_for_port

PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_serve_and_scrape():
    metrics = StageMetrics("toy", "run-1")
    items = metrics.counter("items_total", "items")
    errors = metrics.counter("errors_total", "errors", ["reason"])
    port = free_port()
    metrics.serve(port)
    try:
        items.inc(3)
        errors.labels(reason="http_404").inc()
        text = get(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.stop()
    assert "clipforge_toy_items_total 3.0" in text
    assert 'clipforge_toy_errors_total{reason="http_404"} 1.0' in text
    assert "clipforge_toy_duration_seconds" in text


@pytest.fixture
def pushgateway():
    port = free_port()
    proc = subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_push_groups_by_run_and_stage(pushgateway):
    metrics = StageMetrics("toy", "run-7")
    metrics.gauge("ratio", "a ratio").set(0.25)
    metrics.mark_success()
    metrics.push(pushgateway)
    text = get(f"{pushgateway}/metrics")
    line = next(ln for ln in text.splitlines() if ln.startswith("clipforge_toy_ratio{"))
    assert 'run_id="run-7"' in line and 'stage="toy"' in line and 'job="clipforge_toy"' in line
    assert line.endswith(" 0.25")
    assert "clipforge_toy_last_success_timestamp_seconds{" in text


def test_push_to_an_absent_gateway_does_not_fail(caplog):
    StageMetrics("toy", "r").push(f"http://127.0.0.1:{free_port()}")
    assert "could not push metrics" in caplog.text
