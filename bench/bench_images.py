"""Image build time and size per stage, and the demo run in the stage containers.

Runs what `make images` runs (docker/build.py: bootstrapped base, wheelhouse, four builds) against
a private dockerd, then the demo pipeline in the containers, locked down as in k8s/ (uid 1000,
read-only root, tmpfs for /tmp and HOME, --network host to a moto S3 server on 127.0.0.1).
Needs root, dockerd and debootstrap. Writes bench/results/images-<date>.json.

    python -m bench.bench_images [--wheelhouse DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, write_result

REGISTRY, TAG = "clipforge.bench", "bench"


def _build_module():
    spec = importlib.util.spec_from_file_location("clipforge_docker_build", REPO / "docker" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_steps() -> list[tuple[str, list[str], list[str]]]:
    run = "s3://bench/runs/demo"
    common = ["--root", "s3://bench/runs", "--run-id", "demo"]
    latest = f"{run}/checkpoints/LATEST"
    return [
        ("download", [], [*common, "--demo", "--demo-samples", "300", "--samples-per-shard", "100",
                          "--processes", "1", "--threads", "8"]),
        ("train", ["--shm-size", "512m", "--entrypoint", "torchrun"], [
            "--standalone", "--nproc-per-node", "2", "--module", "stages.train", *common, "--train-data",
            f"{run}/data", "--model", "clipforge-demo", "--batch-size", "32", "--steps", "8",
            "--save-every-steps", "4", "--warmup", "2", "--workers", "0", "--device", "cpu"]),
        ("evaluate", [], [*common, "--checkpoint", latest, "--workers", "0", "--output", f"{run}/eval/results.json",
                          "--eval-data", f"demo={run}/evalsets/demo", "--val-data", f"{run}/data"]),
        ("export", [], [*common, "--checkpoint", latest, "--output", f"{run}/export"]),
    ]


def run_demo(host: str, endpoint: str) -> dict[str, float]:
    from pipelines.podspec import RUN_AS_USER, WRITABLE_DIRS

    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    flags = ["--rm", "--network", "host", "--user", f"{RUN_AS_USER}:{RUN_AS_USER}", "--read-only", "--cap-drop", "ALL"]
    for path, size in WRITABLE_DIRS.values():
        flags += ["--tmpfs", f"{path}:rw,uid={RUN_AS_USER},gid={RUN_AS_USER},size={size.removesuffix('i')}"]
    flags += [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    times = {}
    for stage, extra, args in _demo_steps():
        started = time.monotonic()
        subprocess.run(["docker", "run", *flags, *extra, f"{REGISTRY}/clipforge-{stage}:{TAG}", *args], check=True,
                       env={**os.environ, "DOCKER_HOST": host}, capture_output=True)
        times[stage] = round(time.monotonic() - started, 1)
    times["total"] = round(sum(times.values()), 1)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="image build time/size and the demo in containers")
    p.add_argument("--wheelhouse", default="", help="reuse this wheelhouse (default: a fresh one)")
    args = p.parse_args(argv)
    build = _build_module()
    with tempfile.TemporaryDirectory(prefix="clipforge-bench-images-") as tmp:
        engine = build.Engine(Path(tmp) / "engine").start()
        port = _free_port()
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            report = Path(tmp) / "report.json"
            subprocess.run([sys.executable, str(REPO / "docker" / "build.py"), "--wheelhouse",
                            args.wheelhouse or str(Path(tmp) / "wheels"), "--registry", REGISTRY, "--tag", TAG,
                            "--report", str(report)], check=True, cwd=REPO,
                           env={**os.environ, "DOCKER_HOST": engine.host}, stdout=subprocess.DEVNULL)
            built = json.loads(report.read_text())
            import boto3

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="bench",
                         aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
            demo = run_demo(engine.host, f"http://127.0.0.1:{port}")
            disk = subprocess.run(["du", "-sb", str(Path(tmp) / "engine" / "data")], capture_output=True,
                                  text=True).stdout.split()[0]
        finally:
            moto.terminate()
            moto.wait(10)
            engine.stop()
            shutil.rmtree(Path(tmp) / "engine" / "data", ignore_errors=True)
    path = write_result("images", {"build": built, "engine_disk_bytes": int(disk), "demo_in_containers_s": demo},
                        packages=())
    print(json.dumps({"build": built, "demo_in_containers_s": demo}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
