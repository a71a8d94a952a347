"""open_clip_train's `--dataset-type csv`: a table of image paths and captions, read from any store.

Keys and separator are open_clip_train's (`--csv-img-key filepath`, `--csv-caption-key title`,
`--csv-separator` tab). open_clip_train opens relative image paths from the working directory; so
does clipforge when the file is there, else relative to the table's own folder, so a table and its
images can sit side by side in a bucket. Kept here rather than open_clip_train's CsvDataset
because that one reads only local files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

from stages.common import storage
from stages.common.errors import ConfigError, DataError


def read_table(uri: str, sep: str, img_key: str, caption_key: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), sep=sep)
    except FileNotFoundError as exc:
        raise ConfigError(f"--train-data {uri}: no such CSV table") from exc
    except Exception as exc:
        raise DataError(f"{uri}: not a readable table with separator {sep!r}: {exc}") from exc
    missing = [k for k in (img_key, caption_key) if k not in table.columns]
    if missing:
        raise ConfigError(f"{uri}: no column {missing[0]!r} (columns: {list(table.columns)}); "
                          "set --csv-img-key/--csv-caption-key/--csv-separator")
    if table.empty:
        raise DataError(f"{uri}: the table has no rows")
    return table


def image_uri(path: str, table_uri: str) -> str:
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    return storage.join(table_uri.rsplit("/", 1)[0], path) if "/" in table_uri else path


class CsvDataset(Dataset):
    def __init__(self, uri: str, preprocess: Callable, tokenizer: Callable, cfg: Any):
        table = read_table(uri, cfg.csv_separator, cfg.csv_img_key, cfg.csv_caption_key)
        self.images = [image_uri(str(p), uri) for p in table[cfg.csv_img_key]]
        self.captions = [str(c) for c in table[cfg.csv_caption_key]]
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, idx: int):
        try:
            image = Image.open(io.BytesIO(storage.read_bytes(self.images[idx])))
        except Exception as exc:
            raise DataError(f"{self.images[idx]} (row {idx}): cannot read the image: {exc}") from exc
        return self.preprocess(image), self.tokenizer([self.captions[idx]])[0]
