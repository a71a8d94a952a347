"""stages.common.storage on local disk and on a real S3 server (moto), including outages."""

from __future__ import annotations

import logging

import pytest

from stages.common import storage
from stages.common.errors import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3") + "/prefix"


@pytest.fixture
def fast_retries(monkeypatch):
    """Short backoff: the module reads its retry settings from the environment on every call."""
    monkeypatch.setenv("CLIPFORGE_STORAGE_BACKOFF_S", "0.05")


def retry_warnings(caplog) -> int:
    return sum("transient" in r.getMessage() for r in caplog.records if r.name == storage.__name__)


def test_bytes_text_json_roundtrip(root):
    storage.write_bytes(storage.join(root, "a.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "b.txt"), "héllo")
    storage.write_json(storage.join(root, "c.json"), {"x": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "b.txt")) == "héllo"
    assert storage.read_json(storage.join(root, "c.json")) == {"x": [1, 2]}
    assert storage.size(storage.join(root, "b.txt")) == len("héllo".encode())
    storage.write_text(storage.join(root, "b.txt"), "new")
    assert storage.read_text(storage.join(root, "b.txt")) == "new"
    with storage.open_read(storage.join(root, "a.bin")) as f:
        assert f.read() == b"\x00\x01"


def test_listing_glob_walk_delete(root):
    for name in ("d/1.tar", "d/2.tar", "d/x.json", "d/sub/3.tar"):
        storage.write_bytes(storage.join(root, name), b"x")
    listed = [u.rsplit("/", 1)[-1] for u in storage.listdir(storage.join(root, "d"))]
    assert listed == ["1.tar", "2.tar", "sub", "x.json"]
    assert all(u.startswith(root.split("://")[0]) for u in storage.listdir(storage.join(root, "d")))
    assert [u.rsplit("/", 1)[-1] for u in storage.glob(storage.join(root, "d", "*.tar"))] == ["1.tar", "2.tar"]
    assert sorted(u.rsplit("/", 1)[-1] for u in storage.walk_files(storage.join(root, "d"))) == [
        "1.tar", "2.tar", "3.tar", "x.json"]
    assert storage.listdir(storage.join(root, "absent")) == []
    storage.delete(storage.join(root, "d", "1.tar"))
    storage.delete(storage.join(root, "d", "1.tar"))  # absent: fine
    assert not storage.exists(storage.join(root, "d", "1.tar"))
    storage.delete(storage.join(root, "d"), recursive=True)
    assert list(storage.walk_files(storage.join(root, "d"))) == []


def test_copy_upload_download(root, tmp_path, s3):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    storage.upload_file(str(src), storage.join(root, "up.bin"))
    storage.copy(storage.join(root, "up.bin"), storage.join(root, "copy.bin"))
    storage.copy(storage.join(root, "up.bin"), f"{s3}/other/cross.bin")  # across stores
    storage.download_file(storage.join(root, "copy.bin"), str(tmp_path / "back" / "got.bin"))
    assert (tmp_path / "back" / "got.bin").read_bytes() == src.read_bytes()
    assert storage.read_bytes(f"{s3}/other/cross.bin") == src.read_bytes()


def test_local_specifics(tmp_path, s3):
    folder = str(tmp_path / "a" / "b")
    storage.makedirs(folder)
    assert storage.is_local(folder) and storage.local_path(folder) == folder
    storage.makedirs(f"{s3}/no/folders")  # object stores have none: no-op
    assert not storage.is_local(s3) and storage.local_path(f"{s3}/x") is None
    assert storage.join("s3://b/p/", "/q/", "r") == "s3://b/p/q/r"
    storage.write_bytes(str(tmp_path / "f"), b"1")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    (tmp_path / "plain").write_bytes(b"1")  # an atomic write leaves the mode a plain write gives
    assert (tmp_path / "f").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_invalid_json_is_a_clear_error(root):
    storage.write_bytes(storage.join(root, "bad.json"), b"{not json")
    with pytest.raises(StorageError, match="bad.json is not valid JSON"):
        storage.read_json(storage.join(root, "bad.json"))


@pytest.mark.parametrize("what", ["no_key", "no_bucket"])
def test_permanent_errors_are_not_retried(s3, caplog, fast_retries, what):
    uri = f"{s3}/missing.bin" if what == "no_key" else "s3://no-such-bucket-here/x.bin"
    caplog.set_level(logging.WARNING)
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri)
    assert uri in str(info.value) and "no such object or bucket" in str(info.value)
    assert "attempts" not in str(info.value)
    assert retry_warnings(caplog) == 0


def test_local_missing_file_is_not_retried(tmp_path, caplog, fast_retries):
    caplog.set_level(logging.WARNING)
    with pytest.raises(StorageError, match="no such object"):
        storage.read_bytes(str(tmp_path / "nope"))
    assert retry_warnings(caplog) == 0


def test_write_while_store_is_down_retries_then_fails_cleanly(flaky_s3, caplog, fast_retries):
    bucket, proxy = flaky_s3
    uri = f"{bucket}/ckpt/step_1.pt"
    caplog.set_level(logging.WARNING)
    proxy.down()
    with pytest.raises(StorageError) as info:
        storage.write_bytes(uri, b"x" * 100_000)
    message = str(info.value)
    assert uri in message and f"after {storage._retry_settings()[0] + 1} attempts" in message
    assert "AWS_ENDPOINT_URL" in message
    assert retry_warnings(caplog) == storage._retry_settings()[0]
    proxy.up()
    storage._invalidate(uri)
    assert not storage.exists(uri), "a failed write must leave no object behind"


class _UpOnFirstRetry(logging.Handler):
    """Brings the store back when storage logs its first retry: the outage spans an attempt."""

    def __init__(self, proxy):
        super().__init__()
        self.proxy, self.retries = proxy, 0

    def emit(self, record: logging.LogRecord) -> None:
        if "transient" in record.getMessage():
            self.retries += 1
            if self.retries == 1:
                self.proxy.up()


def test_store_back_during_retries_completes_the_write(flaky_s3, fast_retries):
    bucket, proxy = flaky_s3
    uri = f"{bucket}/data/manifest.json"
    handler = _UpOnFirstRetry(proxy)
    logging.getLogger(storage.__name__).addHandler(handler)
    proxy.down()
    try:
        storage.write_json(uri, {"ok": True})
    finally:
        logging.getLogger(storage.__name__).removeHandler(handler)
    assert handler.retries == 1
    assert storage.read_json(uri) == {"ok": True}
