"""Pieces every stage shares: storage, config, metrics, logging, errors.

Importing this package must stay cheap and must not import torch: the download image has none.
"""

from stages.common.errors import ClipforgeError, ConfigError, DataError, StorageError

__all__ = ["ClipforgeError", "ConfigError", "DataError", "StorageError"]
