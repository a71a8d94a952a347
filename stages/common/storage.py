"""Object storage on fsspec: every URI is an fsspec URI (s3://, gs://, file://, plain path).

Guarantees the stages rely on:
- a write is visible whole or not at all (local: temp file + rename; S3: one PUT or a completed
  multipart upload, which S3 publishes atomically);
- transient failures (connection refused/reset, timeouts, 5xx, throttling) are retried with
  exponential backoff; permanent ones (no bucket, access denied, no such key) raise at once
  with a message naming the URI and what to check.

S3-compatible stores are configured the standard way: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from stages.common.errors import DataError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_MAX_S = 20.0
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def _retry_settings() -> tuple[int, float]:
    """Read per call, so a long-lived process honours the environment it was given."""
    return (int(os.environ.get("CLIPFORGE_STORAGE_RETRIES", "5")),
            float(os.environ.get("CLIPFORGE_STORAGE_BACKOFF_S", "0.5")))

_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "TooManyRequests", "RequestLimitExceeded"}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError", "ClientPayloadError", "FSTimeoutError", "IncompleteRead",
                    "ResponseStreamingError", "ProxyConnectionError", "HTTPClientError"}


def _is_transient(exc: BaseException) -> bool:
    """True for failures that a retry may cure; walks the exception's cause chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                            NotADirectoryError, FileExistsError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_CODES or status.startswith("5") or status == "429":
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hint(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such object or bucket: check the path and that the bucket exists"
    if isinstance(exc, PermissionError):
        return "access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy"
    if _is_transient(exc):
        return ("the store kept failing after retries: check that the endpoint "
                f"(AWS_ENDPOINT_URL={os.environ.get('AWS_ENDPOINT_URL', 'unset')}) is reachable")
    return "check the URI and the store's credentials"


def retrying(what: str, uri: str, fn: Callable[[], T], retries: int | None = None) -> T:
    """Run fn, retrying transient storage errors with jittered exponential backoff."""
    default_retries, backoff_s = _retry_settings()
    retries = default_retries if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as StorageError
            if not _is_transient(exc) or attempt == retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise StorageError(f"{what} {uri} failed{tries}: {type(exc).__name__}: {exc} "
                                   f"({_hint(exc)})") from exc
            delay = min(BACKOFF_MAX_S, backoff_s * 2 ** attempt) * (0.5 + random.random())
            log.warning("%s %s: transient %s (%s); retry %d/%d in %.1fs", what, uri,
                        type(exc).__name__, exc, attempt + 1, retries, delay)
            _invalidate(uri)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _invalidate(uri: str) -> None:
    """Drop cached listings so a retry sees the store as it is now."""
    try:
        fs, _ = url_to_fs(uri)
        fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - best effort only
        pass


def _storage_options(uri: str) -> dict[str, Any]:
    # botocore reads AWS_ENDPOINT_URL itself; passing it explicitly also covers clients
    # (aiobotocore in s3fs) that ignore the variable, and keeps botocore's own retries short
    # so that ours, which log and back off, are the ones that count.
    if uri.startswith(("s3://", "s3a://")):
        opts: dict[str, Any] = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                                                  "connect_timeout": 10, "read_timeout": 60}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path within it."""
    return url_to_fs(uri, **_storage_options(uri))


def is_local(uri: str) -> bool:
    fs, _ = filesystem(uri)
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme of base."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _unstrip(fs: fsspec.AbstractFileSystem, uri: str, path: str) -> str:
    """Give a path returned by fs the scheme of the URI it came from."""
    if "://" not in uri:
        return path
    return fs.unstrip_protocol(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying("checking", uri, lambda: fs.exists(path))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return retrying("reading", uri, lambda: fs.cat_file(path))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri} is not valid JSON: {exc}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically: readers see the old content or the new, never a part."""
    fs, path = filesystem(uri)
    if "file" in _protocols(fs):
        retrying("writing", uri, lambda: _atomic_local_write(path, data))
    else:
        retrying("writing", uri, lambda: fs.pipe_file(path, data))


def _atomic_local_write(path: str, data: bytes) -> None:
    with _local_atomic(path) as f:
        f.write(data)


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[Any]:
    """A temporary file in the target's folder, fsynced and renamed onto it on a clean exit."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_atomic_write(uri: str, block_size: int = 64 * 2**20) -> Iterator[Any]:
    """A binary stream to a new object that appears whole on a clean exit, and not at all otherwise.

    Local: a temporary file in the same folder, fsynced and renamed into place. Object stores:
    fsspec's buffered writer (on S3 a multipart upload of `block_size` parts, which the store
    publishes only when completed), discarded (multipart aborted) on error. One attempt: callers
    retry the whole write, as a stream cannot be rewound.
    """
    fs, path = filesystem(uri)
    if "file" in _protocols(fs):
        with _local_atomic(path) as f:
            yield f
        return
    f = fs.open(path, "wb", block_size=block_size)
    try:
        yield f
    except BaseException:
        try:  # abort the multipart upload; the store may be the thing that failed
            f.discard()
        except Exception as exc:  # noqa: BLE001 - the original error is the one to report
            log.debug("discarding the partial upload of %s failed: %s", uri, exc)
        raise
    f.close()


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to a URI atomically (S3: multipart upload, visible on completion)."""
    fs, path = filesystem(uri)
    if "file" in _protocols(fs):
        def _copy() -> None:
            with open(local_path, "rb") as f:
                _atomic_local_write(path, f.read())
        retrying("uploading to", uri, _copy)
    else:
        retrying("uploading to", uri, lambda: fs.put_file(local_path, path))


def download_file(uri: str, local_path: str) -> None:
    fs, path = filesystem(uri)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)) or ".", exist_ok=True)
    retrying("downloading", uri, lambda: fs.get_file(path, local_path))


def child_path(folder: str, relative: str, source: str) -> str:
    """`folder/relative` for a name read from a store, refused when it would land outside `folder`."""
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, relative))
    if not relative or os.path.isabs(relative) or os.path.commonpath([root, target]) != root or target == root:
        raise DataError(f"{source}: the name {relative!r} would be written outside {folder}; refusing to copy it")
    return target


def download_folder(uri: str, local: str) -> list[str]:
    """Copy every object under `uri` into the local folder `local`; returns the local paths.

    Object keys are names chosen by whoever wrote the store: one with `..` or a leading `/` in its
    relative part is refused (and nothing is copied) instead of being written elsewhere on disk.
    """
    prefix = uri.rstrip("/") + "/"
    pairs = []
    for src in walk_files(uri):
        if not src.startswith(prefix):
            raise DataError(f"{src}: listed under {uri} but not inside it; refusing to copy it")
        pairs.append((src, child_path(local, src[len(prefix):], src)))
    for src, dst in pairs:
        download_file(src, dst)
    return [dst for _, dst in pairs]


def open_read(uri: str, mode: str = "rb"):
    """A file-like object for streaming reads (opened with retries; reads are not retried)."""
    fs, path = filesystem(uri)
    return retrying("opening", uri, lambda: fs.open(path, mode))


def listdir(uri: str) -> list[str]:
    """URIs of the entries directly under a folder, sorted; [] when the folder does not exist."""
    fs, path = filesystem(uri)

    def _ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(_unstrip(fs, uri, p) for p in entries if p.rstrip("/") != path.rstrip("/"))
    return retrying("listing", uri, _ls)


def glob(pattern: str) -> list[str]:
    """URIs matching a glob pattern, sorted."""
    fs, path = filesystem(pattern)
    return sorted(_unstrip(fs, pattern, p) for p in retrying("listing", pattern, lambda: fs.glob(path)))


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(retrying("stat of", uri, lambda: fs.size(path)))


def delete(uri: str, recursive: bool = False) -> None:
    """Delete an object (or a folder with recursive=True); deleting what is absent is fine."""
    fs, path = filesystem(uri)

    def _rm() -> None:
        try:
            if recursive:
                fs.rm(path, recursive=True)
            else:  # s3fs's rm() is a bulk delete that ignores per-key errors (AccessDenied)
                fs.rm_file(path)
        except FileNotFoundError:
            pass
    retrying("deleting", uri, _rm)


def copy(src: str, dst: str) -> None:
    """Copy one object, within a store or across stores."""
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    if src_fs is dst_fs and "file" not in _protocols(src_fs):
        retrying("copying to", dst, lambda: src_fs.copy(src_path, dst_path))
        return
    write_bytes(dst, read_bytes(src))


def makedirs(uri: str) -> None:
    """Create a local folder; object stores have no folders, so this is a no-op there."""
    fs, path = filesystem(uri)
    if "file" in _protocols(fs):
        os.makedirs(path, exist_ok=True)


def walk_files(uri: str) -> Iterator[str]:
    """Every object under a folder, recursively, as URIs."""
    fs, path = filesystem(uri)
    for p in retrying("listing", uri, lambda: fs.find(path)):
        yield _unstrip(fs, uri, p)


def local_path(uri: str) -> str | None:
    """The plain filesystem path of a local URI, else None."""
    fs, path = filesystem(uri)
    return path if "file" in _protocols(fs) else None
