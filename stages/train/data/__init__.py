"""The train stage's data: webdataset shards from any fsspec store into (images, texts) batches.

One module per job: `sources` (what --train-data names), `plan` (who reads which samples in an
epoch, and where a resume continues), `decode` (image bytes to the batch tensor), `pool`
(shared-memory batch buffers), `stream` (one rank's batches, per DataLoader worker) and `loader`
(the DataLoader the trainer uses, with its saveable position). Shards, manifests, sample keys and
safe reading are `stages.common.shards`, shared with the evaluate stage.
"""

from stages.train.data.decode import ImageDecoder
from stages.train.data.loader import DataInfo, TrackingLoader, get_train_data, get_val_data, probe_train_data
from stages.train.data.plan import Item, rank_worker_shards, worker_quota
from stages.train.data.sources import Source, resolve_sources, resolve_train_shards
from stages.train.data.stream import PREFETCH, SAMPLE_SHUFFLE, ShardStream

__all__ = ["PREFETCH", "SAMPLE_SHUFFLE", "DataInfo", "ImageDecoder", "Item", "ShardStream", "Source",
           "TrackingLoader", "get_train_data", "get_val_data", "probe_train_data", "rank_worker_shards",
           "resolve_sources", "resolve_train_shards", "worker_quota"]
