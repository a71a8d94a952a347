"""Redaction of what a run publishes: URLs keep scheme, public host, bucket and path; the rest goes."""

from __future__ import annotations

import logging

import pytest

from stages.common.logs import setup_logging
from stages.common.redact import INTERNAL_HOST, REDACTED, redact, redact_text, redact_url

PRESIGNED = ("https://clipforge-data.s3.us-east-1.amazonaws.com/lists/urls-0.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261201%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
             "&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")


@pytest.mark.parametrize("url,want", [
    (PRESIGNED, "https://clipforge-data.s3.us-east-1.amazonaws.com/lists/urls-0.parquet"),
    ("https://storage.googleapis.com/bkt/urls.parquet?X-Goog-Signature=abc&X-Goog-Credential=x",
     "https://storage.googleapis.com/bkt/urls.parquet"),
    ("https://user:hunter2@data.example.com:8443/u.csv#frag", "https://data.example.com:8443/u.csv"),
    ("http://clipforge-pushgateway:9091", f"http://{INTERNAL_HOST}"),
    ("http://pushgateway.monitoring.svc.cluster.local:9091/metrics/job/x", f"http://{INTERNAL_HOST}/metrics/job/x"),
    ("http://minio.minio.svc:9000/clipforge/runs/r1/data", f"http://{INTERNAL_HOST}/clipforge/runs/r1/data"),
    ("http://10.0.3.7:9000/bucket/key", f"http://{INTERNAL_HOST}/bucket/key"),
    ("http://169.254.169.254/latest/meta-data/", f"http://{INTERNAL_HOST}/latest/meta-data/"),
    ("http://[fd00:ec2::254]/latest", f"http://{INTERNAL_HOST}/latest"),
    ("http://127.0.0.1:39555/bkt/urls.parquet?X-Amz-Signature=1", f"http://{INTERNAL_HOST}/bkt/urls.parquet"),
    ("s3://clipforge/runs/r1/checkpoints/step_8.pt", "s3://clipforge/runs/r1/checkpoints/step_8.pt"),
    ("gs://bkt/runs/r1/data", "gs://bkt/runs/r1/data"),
    ("s3://AKIAIOSFODNN7EXAMPLE:secret@bkt/key", "s3://bkt/key"),
])
def test_urls_keep_bucket_and_path_and_lose_credentials_queries_and_internal_hosts(url, want):
    assert redact_url(url) == want


def test_free_text_and_records_are_redacted_everywhere():
    text = f"url list `{PRESIGNED}` pushed to http://clipforge-pushgateway:9091 with key AKIAIOSFODNN7EXAMPLE"
    out = redact_text(text)
    assert "X-Amz" not in out and "AKIAIOSFODNN7EXAMPLE" not in out and "clipforge-pushgateway" not in out
    assert "`https://clipforge-data.s3.us-east-1.amazonaws.com/lists/urls-0.parquet`" in out
    record = {"pushgateway": "http://pg.monitoring.svc:9091", "hf_token": "hf_abc", "password": "p",
              "AWS_SECRET_ACCESS_KEY": "s", "train_data": ["s3://b/x::s3://b/y"], "steps": 8,
              "hf_tokenizer_name": "bert-base", "max_tokens": 77, "token": ""}
    assert redact(record) == {"pushgateway": f"http://{INTERNAL_HOST}", "hf_token": REDACTED, "password": REDACTED,
                              "AWS_SECRET_ACCESS_KEY": REDACTED, "train_data": ["s3://b/x::s3://b/y"], "steps": 8,
                              "hf_tokenizer_name": "bert-base", "max_tokens": 77, "token": ""}


def test_log_lines_are_redacted(capsys):
    log = setup_logging("download", "r1")
    log.info("reading %s", PRESIGNED)
    log.warning("could not push metrics to %s: %s", "http://pushgateway.monitoring.svc:9091", "refused")
    err = capsys.readouterr().err
    logging.getLogger().handlers.clear()
    assert "reading https://clipforge-data.s3.us-east-1.amazonaws.com/lists/urls-0.parquet" in err
    assert "X-Amz" not in err and "monitoring.svc" not in err and f"http://{INTERNAL_HOST}" in err
