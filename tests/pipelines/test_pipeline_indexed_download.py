"""The download Indexed Job of k8s/base, its pods' command run as Kubernetes would run it.

No cluster here: each "pod" is the rendered container command run by `sh` with the index in
JOB_COMPLETION_INDEX, as the Job controller sets it, against the real moto S3 server.
"""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import fsspec
import pytest
import yaml

from pipelines.manifests import K8S_DIR
from tests.conftest import free_port


@pytest.mark.slow
def test_each_pod_downloads_its_part_and_the_last_one_publishes_the_manifest(s3, moto_server, cli_env):
    boto3.client("s3", endpoint_url=moto_server.endpoint).create_bucket(Bucket="clipforge")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "stages.download.demo", "--output", "s3://clipforge/input",
                               "--samples", "200", "--eval-samples", "10", "--port", str(port), "--serve"],
                              env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        while line and "serving" not in line:
            line = server.stdout.readline()
        assert "serving" in line, "the demo server did not start"
        job = yaml.safe_load((K8S_DIR / "base" / "download-job.yaml").read_text().split("---")[-1])
        pods = job["spec"]["completions"]
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        command = [sys.executable if c == "python" else c for c in command]
        script = command[2].replace("python -m", f"{sys.executable} -m")
        # the demo server is on loopback, which the download refuses unless told
        argv = [*command[:2], script, *command[3:], "--samples-per-shard", "25", "--allow-private-networks"]
        fs = fsspec.filesystem("s3")
        fs.invalidate_cache()
        for index in range(pods):
            pod = subprocess.run(argv, env={**cli_env, "JOB_COMPLETION_INDEX": str(index)},
                                 capture_output=True, text=True, timeout=600)
            assert pod.returncode == 0, pod.stderr[-3000:]
            fs.invalidate_cache()
            published = fs.exists("clipforge/runs/example/data/manifest.json")
            assert published == (index == pods - 1), f"after pod {index}: manifest published={published}"
    finally:
        server.terminate()
        server.wait(timeout=30)
    manifest = json.loads(fs.cat("clipforge/runs/example/data/manifest.json"))
    assert manifest["parts"] == pods and manifest["total_samples"] == 200
