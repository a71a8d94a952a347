"""What a run publishes leaks nothing: a presigned URL list and an internal Pushgateway, end to end.

The URL list is a real presigned URL of the moto S3 server (its query carries the key id and the
signature); the stages push to an internal Pushgateway address (nothing listens there, so each
stage logs a warning naming it). Download, train and export run as the real commands; then the
exported folder, run.json and every log line are searched for what must not be there.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import boto3
import pandas as pd
import pytest
from botocore.config import Config

from stages.common import storage
from tests.conftest import free_port
from tests.download.dlkit import LoopbackImages

KEY_ID, SECRET = "AKIACLIPFORGETEST123", "cf-secret-must-not-leak"


def _stage(stage: str, args: list[str], env: dict, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_card_config_run_record_and_logs_carry_no_secrets_or_internal_endpoints(s3, cli_env, moto_server,
                                                                                 monkeypatch):
    images = LoopbackImages()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    env = {**cli_env, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "OMP_NUM_THREADS": "1"}
    bucket = s3.removeprefix("s3://")
    try:
        table = pd.DataFrame({"url": [f"{images.base}/img/{i}.png" for i in range(48)],
                              "caption": [f"a photo of colour {i % 4}" for i in range(48)]})
        buf = io.BytesIO()
        table.to_parquet(buf)
        client = boto3.client("s3", endpoint_url=moto_server.endpoint, aws_access_key_id=KEY_ID,
                              aws_secret_access_key=SECRET, region_name="us-east-1",
                              config=Config(signature_version="s3v4"))
        client.put_object(Bucket=bucket, Key="lists/urls.parquet", Body=buf.getvalue())
        presigned = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "lists/urls.parquet"},
                                                  ExpiresIn=600)
        assert "X-Amz-Signature=" in presigned and KEY_ID in presigned
        signature = parse_qs(urlsplit(presigned).query)["X-Amz-Signature"][0]
        pushgateway = f"http://localhost:{free_port()}"  # internal, and nothing listens there

        root, run = f"{s3}/runs", f"{s3}/runs/r1"
        common = ["--root", root, "--run-id", "r1", "--pushgateway", pushgateway]
        logs = _stage("download", [*common, "--url-list", presigned, "--allow-private-networks", "--samples-per-shard", "24",
                                   "--processes", "1", "--threads", "4", "--image-size", "32"], env)
        logs += _stage("train", [*common, "--train-data", f"{run}/data", "--model", "clipforge-micro",
                                 "--batch-size", "8", "--steps", "2", "--warmup", "1", "--workers", "0",
                                 "--val-data", "none", "--device", "cpu"], env)
        logs += _stage("export", [*common, "--checkpoint", f"{run}/checkpoints/LATEST", "--output", f"{run}/export"],
                       env)
    finally:
        images.close()

    assert "could not push metrics to http://internal-host" in logs  # the warning is there, redacted
    published = {name: storage.read_bytes(f"{run}/export/{name}").decode()
                 for name in ("README.md", "open_clip_config.json")}
    published["run.json"] = storage.read_bytes(f"{run}/run.json").decode()
    published["logs"] = logs
    port = moto_server.endpoint.rsplit(":", 1)[-1]
    for name, text in published.items():
        for secret in (KEY_ID, SECRET, signature, "X-Amz-", pushgateway, f"localhost:{port}", f"127.0.0.1:{port}",
                       images.base.removeprefix("http://")):
            assert secret not in text, f"{name} leaks {secret!r}"
    # still says where the data came from: bucket and path of the URL list, the run's own store
    card = published["README.md"]
    assert f"http://internal-host/{bucket}/lists/urls.parquet" in card
    assert json.loads(published["open_clip_config.json"])["clipforge"]["checkpoint"] == \
        f"{run}/checkpoints/step_2.pt"
    record = json.loads(published["run.json"])
    assert record["stages"]["download"]["inputs"]["url_list"] == f"http://internal-host/{bucket}/lists/urls.parquet"
    assert record["stages"]["train"]["config"]["pushgateway"] == "http://internal-host"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # the stages really ran with these credentials
