"""`make monitor` (stages.common.monitor_local): real Prometheus and Pushgateway, started and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, free_port, wait_for_port

READY_LINE = "Ctrl-C stops both."


def start_monitor(root: Path, prom: int, push: int, train_ports: str, env: dict) -> tuple[subprocess.Popen, Path]:
    log = root / "monitor.log"
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.common.monitor_local", "--root", str(root), "--prometheus-port",
         str(prom), "--pushgateway-port", str(push), "--train-ports", train_ports, "--scrape-interval", "1s"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while READY_LINE not in log.read_text():
        assert proc.poll() is None, f"monitor exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"monitor not ready:\n{log.read_text()}"
        time.sleep(0.2)
    return proc, log


def stop_monitor(proc: subprocess.Popen, ports: list[int]) -> int:
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(30)
    for port in ports:
        try:
            wait_for_port(port, timeout=0.5)
            raise AssertionError(f"127.0.0.1:{port} still listening after the monitor stopped")
        except TimeoutError:
            pass
    return rc


def test_monitor_starts_both_servers_prints_where_to_look_and_stops_on_ctrl_c(tmp_path, cli_env):
    prom, push = free_port(), free_port()
    proc, log = start_monitor(tmp_path / "runs", prom, push, "9100-9101", cli_env)
    try:
        wait_for_port(prom)
        wait_for_port(push)
        out = log.read_text()
        assert f"http://127.0.0.1:{prom}" in out and f"--pushgateway http://127.0.0.1:{push}" in out
        assert "--metrics-port 9100" in out
        config = (tmp_path / "runs" / ".monitoring" / "prometheus.yml").read_text()
        assert "'127.0.0.1:9100', '127.0.0.1:9101'" in config
    finally:
        rc = stop_monitor(proc, [prom, push])
    assert rc == 0, log.read_text()


def run_monitor(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.common.monitor_local", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_busy_port_is_a_clear_error_before_anything_starts(tmp_path, cli_env):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_monitor(["--root", str(tmp_path), "--prometheus-port", str(port),
                              "--pushgateway-port", str(free_port())], cli_env)
    assert result.returncode == 2
    assert f"--prometheus-port {port}: something already listens on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / ".monitoring").exists()


def test_missing_binaries_and_bad_flags_are_named(tmp_path, cli_env):
    no_path = {**cli_env, "PATH": str(tmp_path)}
    result = run_monitor(["--root", str(tmp_path)], no_path)
    assert result.returncode == 2 and "prometheus, prometheus-pushgateway not installed" in result.stderr
    assert "make system-deps" in result.stderr
    result = run_monitor(["--root", str(tmp_path), "--train-ports", "91OO"], cli_env)
    assert result.returncode == 2 and "--train-ports '91OO'" in result.stderr
    result = run_monitor(["--root", "s3://bucket/runs"], cli_env)
    assert result.returncode == 2 and "--root s3://bucket/runs" in result.stderr
    assert os.listdir(tmp_path) == []
