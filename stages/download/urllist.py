"""The input URL list: which files it is, and a streaming check of each before any download starts.

`--url-list` names one or more files, folders or glob patterns on any fsspec store. Each file is
checked by streaming it (columns, row count, the URL scheme of its first rows), never by reading
it whole, so checking a list of millions of rows takes little memory. Rows are counted the way
img2dataset's reader will read them (the same pyarrow parsers), because the shard numbering of
every part of the list follows from those counts.
"""

from __future__ import annotations

import contextlib
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
SAMPLE_ROWS = 1000  # rows of each file whose URLs are checked before downloading
BLOCK_BYTES = 1 << 20  # streaming block of the text parsers: what memory the check needs per file


@dataclass(frozen=True)
class InputFile:
    uri: str
    input_format: str
    rows: int
    columns: tuple[str, ...]


@contextlib.contextmanager
def local_copies_if_signed(entries: list[str]) -> Iterator[list[str]]:
    """The entries, with each signed URL (one with a query string) fetched to a local file first.

    img2dataset and our logs name the files they read; a presigned URL's signature must not reach
    them. Each list is fetched once, right away, while its signature is still valid.
    """
    signed = [e for e in entries if "://" in e and urlsplit(e).query]
    if not signed:
        yield list(entries)
        return
    with tempfile.TemporaryDirectory(prefix="clipforge-urls-") as tmp:
        local = {}
        for i, uri in enumerate(signed):
            name = urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1] or "urls"
            local[uri] = os.path.join(tmp, f"{i:03d}-{name}")
            storage.download_file(uri, local[uri])
        yield [local.get(e, e) for e in entries]


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


def _is_pattern(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def _is_dir(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return bool(storage.retrying("stat of", uri, lambda: fs.isdir(path)))


def expand(entries: list[str], given_format: str = "") -> list[tuple[str, str]]:
    """(uri, format) of every file the --url-list entries name, in a stable order.

    A folder stands for its files in a known format (or in --input-format), sorted; a glob for
    its matches, sorted; a file for itself. Entries keep the order they were given in.
    """
    out: list[tuple[str, str]] = []
    for entry in entries:
        if _is_pattern(entry):
            found = [u for u in storage.glob(entry) if not _is_dir(u)]
            if not found:
                raise DataError(f"URL list {entry}: the pattern matches no file")
            out += [(u, detect_format(u, given_format)) for u in found]
        elif _is_dir(entry):
            found = [u for u in storage.listdir(entry) if _known(u, given_format)]
            if not found:
                raise DataError(f"URL list {entry} is a folder with no file in a URL list format "
                                f"({', '.join('.' + f for f in FORMATS)})")
            out += [(u, detect_format(u, given_format)) for u in found]
        else:
            fmt = detect_format(entry, given_format)
            if not storage.exists(entry):
                raise DataError(f"URL list {entry} does not exist")
            out.append((entry, fmt))
    formats = {fmt for _, fmt in out}
    if len(formats) > 1:
        raise DataError(f"URL list: the files mix formats {sorted(formats)}; img2dataset reads "
                        "one format per run (split them into separate runs)")
    return out


def _known(uri: str, given: str) -> bool:
    name = uri.rsplit("/", 1)[-1].lower()
    return name.endswith("." + given) if given else any(name.endswith("." + f) for f in FORMATS)


def _stream_text(f, fmt: str):
    """A pyarrow batch reader over a csv/tsv/jsonl/txt stream, parsed as img2dataset parses it."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    base = fmt.removesuffix(".gz")
    if base == "jsonl":
        return pajson.open_json(f, read_options=pajson.ReadOptions(block_size=BLOCK_BYTES))
    if base == "txt":
        return pacsv.open_csv(f, read_options=pacsv.ReadOptions(column_names=["url"],
                                                                block_size=BLOCK_BYTES))
    delimiter = "\t" if base == "tsv" else ","
    return pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
                          parse_options=pacsv.ParseOptions(delimiter=delimiter))


def _scan(uri: str, fmt: str, url_col: str) -> tuple[int, tuple[str, ...], list]:
    """(rows, columns, the first SAMPLE_ROWS values of url_col) by streaming the file."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    if fmt == "parquet":
        with storage.retrying("opening", uri, lambda: fs.open(path, "rb")) as f:
            pf = pq.ParquetFile(f)
            columns = tuple(pf.schema_arrow.names)
            sample: list = []
            if url_col in columns and pf.metadata.num_rows:
                batch = next(pf.iter_batches(batch_size=SAMPLE_ROWS, columns=[url_col]))
                sample = batch.column(0).to_pylist()
            return pf.metadata.num_rows, columns, sample
    compression = "gzip" if fmt.endswith(".gz") else None
    with storage.retrying("opening", uri, lambda: fs.open(path, "rb", compression=compression)) as f:
        reader = _stream_text(f, fmt)
        columns = tuple(reader.schema.names)
        rows, sample = 0, []
        for batch in reader:
            if len(sample) < SAMPLE_ROWS and url_col in columns:
                sample += batch.column(columns.index(url_col)).to_pylist()[:SAMPLE_ROWS - len(sample)]
            rows += batch.num_rows
        return rows, columns, sample


def inspect_file(uri: str, fmt: str, url_col: str, required: list[tuple[str, str]]) -> InputFile:
    """Stream one file: its columns must include the required (flag, column) pairs."""
    if fmt.startswith("txt"):
        url_col, required = "url", []
    try:
        rows, columns, sample = _scan(uri, fmt, url_col)
    except (DataError, StorageError):
        raise
    except StopIteration:
        rows, columns, sample = 0, (), []
    except Exception as exc:  # noqa: BLE001 - any parser error means the file is not what it claims
        raise DataError(f"URL list {uri} could not be read as {fmt}: {type(exc).__name__}: {exc}") from exc
    for flag, col in [("--url-col", url_col), *required]:
        if col and col not in columns:
            raise DataError(f"URL list {uri}: no column {col!r} ({flag}); it has {list(columns)}")
    _check_urls(uri, sample)
    return InputFile(uri=uri, input_format=fmt, rows=rows, columns=columns)


def check_url_list(entries: list[str], given_format: str, url_col: str,
                   required: list[tuple[str, str]]) -> list[InputFile]:
    """Expand the --url-list entries and check every file: the url column and the required
    (flag, column) pairs present, the first rows' URLs http(s), at least one row in all."""
    files = [inspect_file(uri, fmt, url_col, required) for uri, fmt in expand(entries, given_format)]
    if sum(f.rows for f in files) == 0:
        raise DataError(f"URL list {', '.join(entries)} is empty: no rows to download")
    return files


def _check_urls(uri: str, urls: list) -> None:
    bad = [(i, u) for i, u in enumerate(urls) if not isinstance(u, str) or not u.startswith(URL_SCHEMES)]
    if bad:
        examples = ", ".join(f"row {i}: {u!r}" for i, u in bad[:3])
        raise DataError(f"URL list {uri}: {len(bad)} of the first {len(urls)} URLs are not http(s) "
                        f"({examples})")
