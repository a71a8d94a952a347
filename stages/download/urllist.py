"""The input URL list: detect its format, read it, and check it before any download starts."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from stages.common import storage
from stages.common.errors import ConfigError, DataError, StorageError

# img2dataset's input_format names, longest suffix first so "x.csv.gz" is csv.gz, not gz.
FORMATS = ("parquet", "csv.gz", "tsv.gz", "jsonl.gz", "txt.gz", "csv", "tsv", "jsonl", "txt")
URL_SCHEMES = ("http://", "https://")


@dataclass
class UrlList:
    uri: str
    input_format: str
    rows: int
    columns: list[str]


@contextlib.contextmanager
def local_copy_if_signed(uri: str) -> Iterator[str]:
    """A URL list behind a signed URL (one with a query string) as a local file while img2dataset runs.

    img2dataset prints the name of the file it reads; a presigned URL's signature must not reach the
    logs. The list is fetched once, right away, while the signature is still valid.
    """
    if "://" not in uri or not urlsplit(uri).query:
        yield uri
        return
    name = urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1] or "urls"
    with tempfile.TemporaryDirectory(prefix="clipforge-urls-") as tmp:
        local = os.path.join(tmp, name)
        storage.download_file(uri, local)
        yield local


def detect_format(uri: str, given: str = "") -> str:
    if given:
        if given not in FORMATS:
            raise ConfigError(f"--input-format {given!r} is not one of {', '.join(FORMATS)}")
        return given
    path = urlsplit(uri).path if "://" in uri else uri  # a presigned URL's query is not part of its name
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt
    raise ConfigError(f"{uri}: unknown URL list format (the name should end in one of "
                      f"{', '.join('.' + f for f in FORMATS)}, or pass --input-format)")


def _read_table(uri: str, fmt: str):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    if fmt.endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
        fmt = fmt.removesuffix(".gz")
    buf = io.BytesIO(data)
    if fmt == "parquet":
        return pq.read_table(buf)
    if fmt == "txt":
        lines = [ln.strip() for ln in data.decode("utf-8").splitlines() if ln.strip()]
        return pa.table({"url": lines})
    if fmt == "jsonl":
        return pajson.read_json(buf)
    delimiter = "\t" if fmt == "tsv" else ","
    return pacsv.read_csv(buf, parse_options=pacsv.ParseOptions(delimiter=delimiter))


def read_url_list(uri: str, fmt: str):
    """The URL list as a pyarrow table; a clear DataError when it is missing or unreadable."""
    try:
        if not storage.exists(uri):
            raise DataError(f"URL list {uri} does not exist")
        return _read_table(uri, fmt)
    except (DataError, StorageError):
        raise
    except Exception as exc:  # noqa: BLE001 - any parser error means the file is not what it claims
        raise DataError(f"URL list {uri} could not be read as {fmt}: {type(exc).__name__}: {exc}") from exc


def check_url_list(uri: str, fmt: str, url_col: str, caption_col: str,
                   extra_cols: list[str]) -> UrlList:
    """Read and check the list: columns present, not empty, every URL http(s)."""
    table = read_url_list(uri, fmt)
    if fmt.startswith("txt"):
        url_col, caption_col, extra_cols = "url", "", []
    columns = list(table.column_names)
    for flag, col in [("--url-col", url_col), ("--caption-col", caption_col),
                      *[("--save-additional-columns", c) for c in extra_cols]]:
        if col and col not in columns:
            raise DataError(f"URL list {uri}: no column {col!r} ({flag}); it has {columns}")
    if table.num_rows == 0:
        raise DataError(f"URL list {uri} is empty: no rows to download")
    _check_urls(uri, table.column(url_col).to_pylist())
    return UrlList(uri=uri, input_format=fmt, rows=table.num_rows, columns=columns)


def _check_urls(uri: str, urls: list) -> None:
    bad = [(i, u) for i, u in enumerate(urls) if not isinstance(u, str) or not u.startswith(URL_SCHEMES)]
    if bad:
        examples = ", ".join(f"row {i}: {u!r}" for i, u in bad[:3])
        raise DataError(f"URL list {uri}: {len(bad)} of {len(urls)} URLs are not http(s) ({examples})")
