"""The download stage: a URL list → img2dataset webdataset shards + manifest.json; the demo dataset.

Importing this package must not import torch: the download image has none.
"""
