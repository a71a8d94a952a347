"""The fetch guard: refused addresses (decided on resolved addresses, no traffic), redirects, caps."""

from __future__ import annotations

import json
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dlkit import run_download

from stages.download import guard
from stages.download.guard import FetchPolicy, FetchRefused, address_refusal, build_opener, checked_addresses
from stages.download.shards import failure_reason


@pytest.mark.parametrize("ip,reason", [
    ("127.0.0.1", "refused_loopback"), ("127.9.9.9", "refused_loopback"), ("::1", "refused_loopback"),
    ("10.1.2.3", "refused_private"), ("172.20.0.1", "refused_private"), ("192.168.1.1", "refused_private"),
    ("fd12:3456::1", "refused_private"), ("100.64.0.1", "refused_private"),
    ("169.254.169.254", "refused_metadata"), ("fd00:ec2::254", "refused_metadata"),
    ("100.100.100.200", "refused_metadata"), ("169.254.1.1", "refused_link_local"),
    ("fe80::1%eth0", "refused_link_local"), ("0.0.0.0", "refused_reserved"),
    ("224.0.0.1", "refused_reserved"), ("240.0.0.1", "refused_reserved"),
    ("::ffff:127.0.0.1", "refused_loopback"), ("::ffff:10.0.0.1", "refused_private"),
    ("2002:a9fe:a9fe::", "refused_metadata"),  # 6to4 wrapping 169.254.169.254
    ("192.0.2.1", "refused_private"),  # documentation range (Python counts it private)
    ("93.184.216.34", None), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_address_decision(ip, reason):
    assert address_refusal(ip) == reason


def resolver(table: dict[str, list[str]]):
    """Resolved addresses given by the test: the decision runs, nothing is sent anywhere."""
    return lambda host, port: table[host]


def test_host_decision_on_resolved_addresses():
    names = resolver({"kubernetes.default": ["10.96.0.1"], "metadata.google.internal": ["169.254.169.254"],
                      "cdn.example": ["93.184.216.34", "2606:2800:220:1::1"],
                      "rebind.example": ["93.184.216.34", "127.0.0.1"]})
    policy = FetchPolicy()
    assert checked_addresses("cdn.example", 443, policy, names) == ["93.184.216.34", "2606:2800:220:1::1"]
    for host, reason in (("kubernetes.default", "refused_private"),
                         ("metadata.google.internal", "refused_metadata"),
                         ("rebind.example", "refused_loopback")):
        with pytest.raises(FetchRefused) as exc:
            checked_addresses(host, 80, policy, names)
        assert exc.value.reason == reason and failure_reason(str(exc.value)) == reason
        assert host in str(exc.value)
    allowed = FetchPolicy(allow_private_networks=True)
    assert checked_addresses("kubernetes.default", 80, allowed, names) == ["10.96.0.1"]


def fetch(url: str, policy: FetchPolicy, **kw) -> bytes:
    with build_opener(policy, **kw).open(url, timeout=5) as r:
        return r.read()


def test_redirect_into_a_refused_address_is_not_followed(image_server):
    # The test resolves images.test to the loopback server and lets that one address through;
    # the redirect names the metadata address, which is refused before any connection.
    port = image_server.server_address[1]
    names = resolver({"images.test": ["127.0.0.1"], "169.254.169.254": ["169.254.169.254"]})
    policy = FetchPolicy(allow_addresses=frozenset({"127.0.0.1"}))
    assert fetch(f"http://images.test:{port}/img/1.png", policy, resolver=names).startswith(b"\x89PNG")
    target = urllib.parse.quote("http://169.254.169.254/latest/meta-data/", safe="")
    with pytest.raises(FetchRefused) as exc:
        fetch(f"http://images.test:{port}/redirect/{target}", policy, resolver=names)
    assert exc.value.reason == "refused_metadata"
    with pytest.raises(FetchRefused) as exc:
        fetch(f"http://images.test:{port}/redirect/{urllib.parse.quote('file:///etc/passwd', safe='')}",
              policy, resolver=names)
    assert exc.value.reason == "refused_scheme"
    assert image_server.hits[f"/redirect/{target}"] == 1


def test_size_and_time_caps(image_server):
    policy = FetchPolicy(allow_private_networks=True, max_bytes=1 << 20, max_seconds=1.0)
    assert len(fetch(f"{image_server.base}/big/{1 << 19}", policy)) == 1 << 19
    with pytest.raises(FetchRefused) as exc:
        fetch(f"{image_server.base}/big/{8 << 20}", policy)  # no Content-Length: stopped while reading
    assert exc.value.reason == "too_large"
    with pytest.raises(FetchRefused) as exc:
        fetch(f"{image_server.base}/drip/5", policy)  # a byte every 0.1 s: never times out per read
    assert exc.value.reason == "too_slow"
    with pytest.raises(FetchRefused) as exc:
        fetch("ftp://127.0.0.1/x.png", policy)
    assert exc.value.reason == "refused_scheme"


def test_install_replaces_urlopen_in_the_process(image_server):
    import urllib.request

    previous = urllib.request._opener
    try:
        guard.install(FetchPolicy())
        with pytest.raises(FetchRefused, match="refused_loopback"):
            urllib.request.urlopen(f"{image_server.base}/img/1.png", timeout=5)
    finally:
        urllib.request.install_opener(previous)
        guard._installed = None
    assert sum(image_server.hits.values()) == 0


def test_guard_on_refuses_a_loopback_list_without_sending_a_request(tmp_path, image_server, cli_env):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{image_server.base}/img/{i}.png" for i in range(6)]
                             + ["http://localhost:9/x.png"],
                             "caption": [f"c{i}" for i in range(7)]}), urls)
    proc = run_download(["--url-list", str(urls), "--root", str(tmp_path / "runs"), "--run-id", "g",
                         "--samples-per-shard", "4", "--processes", "1", "--threads", "2"], cli_env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "no image of" in proc.stderr and "refused_loopback" in proc.stderr
    assert sum(image_server.hits.values()) == 0, "the guard must refuse before connecting"
    data = tmp_path / "runs" / "g" / "data"
    assert not (data / "manifest.json").exists()
    rejected = json.loads((data / "manifest.rejected.json").read_text())
    assert rejected["failures_by_reason"] == {"refused_loopback": 7}
    assert rejected["attempted"] == 7 and rejected["total_samples"] == 0
