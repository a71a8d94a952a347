"""`make monitor`: a local Prometheus and Pushgateway watching a local run, until Ctrl-C.

    python -m stages.common.monitor_local --root ./runs

Runs Debian's `prometheus` and `prometheus-pushgateway` binaries on 127.0.0.1 with a config made
from monitoring/prometheus/local.yml: it scrapes local trainers (`--metrics-port`, one port per
local rank) and the Pushgateway the batch stages push to, and loads the alert rules. Their data
lives in ROOT/.monitoring/. Standard library only: this must not pull in torch.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stages.common.errors import ClipforgeError, ConfigError

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "monitoring" / "prometheus" / "local.yml"
RULES = REPO / "monitoring" / "rules" / "clipforge.rules.yaml"
BINARIES = ("prometheus", "prometheus-pushgateway")


@dataclass
class Options:
    root: Path
    prometheus_port: int
    pushgateway_port: int
    train_ports: range
    scrape_interval: str

    @property
    def state_dir(self) -> Path:
        return self.root / ".monitoring"


def parse_ports(text: str) -> range:
    """'9100-9107' or '9100' -> the ports; a clear error for anything else."""
    first, _, last = text.partition("-")
    try:
        ports = range(int(first), int(last or first) + 1)
    except ValueError:
        raise ConfigError(f"--train-ports {text!r}: expected a port or a range like 9100-9107") from None
    if not ports or ports[0] < 1 or ports[-1] > 65535:
        raise ConfigError(f"--train-ports {text!r}: not a range of port numbers (1-65535)")
    return ports


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m stages.common.monitor_local", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="./runs", help="local runs folder; data goes to ROOT/.monitoring")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--pushgateway-port", type=int, default=9091)
    parser.add_argument("--train-ports", default="9100-9107",
                        help="trainer metrics ports to scrape: --metrics-port of `clipforge train` "
                             "up to the port of its last local rank")
    parser.add_argument("--scrape-interval", default="5s", help="Prometheus duration, e.g. 1s, 15s")
    args = parser.parse_args(argv)
    if "://" in args.root and not args.root.startswith("file://"):
        raise ConfigError(f"--root {args.root}: the local Prometheus keeps its data on this machine; "
                          "give a local folder")
    if not args.scrape_interval[:-1].isdigit() or args.scrape_interval[-1] not in "sm":
        raise ConfigError(f"--scrape-interval {args.scrape_interval!r}: expected a duration like 5s or 1m")
    return Options(Path(args.root.removeprefix("file://")), args.prometheus_port, args.pushgateway_port,
                   parse_ports(args.train_ports), args.scrape_interval)


def check_ready(opts: Options) -> dict[str, str]:
    """Binaries installed, config sources present, ports free: fail before starting anything."""
    found = {name: shutil.which(name) for name in BINARIES}
    missing = [name for name, path in found.items() if not path]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: run `make system-deps` "
                          "(Debian packages prometheus, prometheus-pushgateway)")
    for path in (TEMPLATE, RULES):
        if not path.is_file():
            raise ConfigError(f"{path} is missing: run from a clipforge source checkout")
    for flag, port in (("--prometheus-port", opts.prometheus_port), ("--pushgateway-port", opts.pushgateway_port)):
        if port_in_use(port):
            raise ConfigError(f"{flag} {port}: something already listens on 127.0.0.1:{port}")
    return found


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def render_config(opts: Options) -> str:
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in opts.train_ports)
    return string.Template(TEMPLATE.read_text()).substitute(
        scrape_interval=opts.scrape_interval, rules=str(RULES), train_targets=f"[{targets}]",
        pushgateway=f"127.0.0.1:{opts.pushgateway_port}", prometheus=f"127.0.0.1:{opts.prometheus_port}")


def commands(opts: Options, binaries: dict[str, str], config: Path) -> dict[str, list[str]]:
    state = opts.state_dir
    return {
        "prometheus-pushgateway": [
            binaries["prometheus-pushgateway"], f"--web.listen-address=127.0.0.1:{opts.pushgateway_port}",
            f"--persistence.file={state / 'pushgateway.db'}", "--persistence.interval=30s"],
        "prometheus": [
            binaries["prometheus"], f"--config.file={config}", f"--storage.tsdb.path={state / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{opts.prometheus_port}", "--web.enable-lifecycle"],
    }


def wait_ready(name: str, url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClipforgeError(f"{name} exited with code {proc.returncode}; its log: {log}\n"
                                 + log.read_text(errors="replace")[-2000:])
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise ClipforgeError(f"{name} not ready at {url} after {timeout:.0f}s; its log: {log}")


def banner(opts: Options) -> str:
    prom, push = f"http://127.0.0.1:{opts.prometheus_port}", f"http://127.0.0.1:{opts.pushgateway_port}"
    first, last = opts.train_ports[0], opts.train_ports[-1]
    return "\n".join([
        f"Prometheus   {prom}   (targets: {prom}/targets, alerts: {prom}/alerts)",
        f"Pushgateway  {push}",
        f"scraping trainers on 127.0.0.1:{first}-{last} every {opts.scrape_interval}; data in {opts.state_dir}",
        "run the stages with:",
        f"  clipforge train ... --metrics-port {first} --pushgateway {push}",
        f"  clipforge download|evaluate|export ... --pushgateway {push}",
        "dashboard: import monitoring/grafana/clipforge.json into a Grafana with this Prometheus as data source",
        "Ctrl-C stops both.",
    ])


def stop(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(opts: Options) -> int:
    binaries = check_ready(opts)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    config = opts.state_dir / "prometheus.yml"
    config.write_text(render_config(opts))
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in commands(opts, binaries, config).items():
            log = opts.state_dir / f"{name}.log"
            # own session: a Ctrl-C in the terminal reaches us, and we stop them in order
            procs[name] = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                           start_new_session=True)
            port = opts.prometheus_port if name == "prometheus" else opts.pushgateway_port
            wait_ready(name, f"http://127.0.0.1:{port}/-/ready", procs[name], log)
        print(banner(opts), flush=True)
        while not stopping.wait(0.5):
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise ClipforgeError(f"{name} exited with code {proc.returncode}; its log: "
                                         f"{opts.state_dir / (name + '.log')}")
        print("stopping Prometheus and Pushgateway", flush=True)
        return 0
    finally:
        stop(procs)


def main(argv: list[str] | None = None) -> int:
    try:
        return serve(parse_args(argv))
    except ClipforgeError as exc:
        print(f"monitor: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
