"""Memory of following a long PyTorchJob log: the launcher's chunked follower vs reading it whole.

A STAND-IN Kubernetes API server on 127.0.0.1 (tests/pipelines/k8s_standin.py; no real one runs
here) serves one master pod whose log is `--megabytes` of training-like lines. A child process
follows it the launcher's way (pipelines.joblogs.LogFollower) and another reads it the way the
kubeflow-training SDK's `get_job_logs` does without follow (`read_namespaced_pod_log`, the whole
text in memory). Each child reports its peak RSS; the result goes to bench/results/joblogs-*.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.common import REPO, write_result

_CHILD = r"""
import resource, sys, time
from kubernetes import client as k8s
from pipelines.jobapi import JobApi
cfg = k8s.Configuration(); cfg.host = sys.argv[1]; cfg.retries = 0
api = JobApi(k8s.ApiClient(cfg), "bench", "clipforge")
lines = 0
def count(_line):
    global lines
    lines += 1
start = time.monotonic()
if sys.argv[2] == "follow":
    from pipelines.joblogs import LogFollower
    LogFollower(api, poll_s=0.05, out=count).start().finish(timeout_s=600)
else:
    pod = api.pods("master", 0)[0]["metadata"]["name"]
    text = api.core.read_namespaced_pod_log(pod, "clipforge", container="pytorch")
    lines = len(text.splitlines())
print(lines, round(time.monotonic() - start, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _child(url: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, url, mode], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    lines, seconds, peak = out.stdout.split()
    return {"mode": mode, "lines": int(lines), "seconds": float(seconds), "peak_rss_mib": round(int(peak) / 2**20, 1)}


def _baseline(url: str) -> float:
    """Peak RSS of the child's imports alone (a pod list, no log), to subtract."""
    code = _CHILD.split("lines = 0")[0] + (
        "import resource\napi.pods('master', 0)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, url], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
    return round(int(out.stdout.split()[0]) / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_joblogs", description=__doc__)
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tests.pipelines.k8s_standin import StandInApiServer

    line = "step 123456/200000 loss 1.234567 lr 5.0e-04 samples/s 12345.6 mfu 0.41 " + "x" * 40
    n_lines = args.megabytes * 2**20 // (len(line) + 1)
    with StandInApiServer() as api:
        api.put_job("bench", "Created", "Running")
        pod = api.add_pod("bench")
        api.start_container(pod)
        api.write_log(pod, *([line] * n_lines))
        api.stop_container(pod)
        base = _baseline(api.url)
        runs = [_child(api.url, "follow"), _child(api.url, "read-whole")]
    for run in runs:
        run["peak_rss_above_imports_mib"] = round(run["peak_rss_mib"] - base, 1)
        assert run["lines"] == n_lines, run
    result = {"log_megabytes": args.megabytes, "log_lines": n_lines, "imports_rss_mib": base, "runs": runs,
              "note": "reference: read_namespaced_pod_log without follow, as TrainingClient.get_job_logs"}
    print(json.dumps(result, indent=2))
    path = write_result("joblogs", result, packages=("kubernetes", "urllib3", "kfp"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
