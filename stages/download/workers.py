"""img2dataset's reader and downloader, for one part of a list and behind the fetch guard.

Imported only when a download runs: it imports img2dataset. The classes live at module level so
img2dataset's worker processes (spawned) can unpickle them.
"""

from __future__ import annotations

from img2dataset.downloader import Downloader
from img2dataset.reader import Reader

from stages.common import storage
from stages.common.errors import DataError
from stages.download import guard
from stages.download.parts import Part


class PartReader(Reader):
    """img2dataset's Reader over one part: the part's files, each at its global first shard id.

    img2dataset's own Reader takes one file or folder and numbers from 0; its `done_shards` skip
    list is the hook that keeps it to the part's shards (the shards of a file outside the part
    count as done).
    """

    def __init__(self, part: Part, done: set[int], **kwargs):
        first = part.files[0].uri if part.files else ""
        super().__init__(first, done_shards=set(done), **kwargs)
        self.part = part
        for f in part.files:
            self.done_shards |= set(range(f.first_shard, part.first_shard))
            self.done_shards |= set(range(part.end_shard, f.end_shard))

    def __iter__(self):
        for f in self.part.files:
            self.fs, path = storage.filesystem(f.uri)
            shards, number = self._save_to_arrow(path, f.first_shard)
            if number != f.shards:
                raise DataError(f"URL list {f.uri} changed since it was checked: {number} shards "
                                   f"of rows now, {f.shards} before; rerun to check it again")
            yield from shards


class GuardedDownloader(Downloader):
    """img2dataset's Downloader with the fetch guard installed in whichever process runs it."""

    def __init__(self, *args, fetch_policy: guard.FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetch_policy = fetch_policy

    def __call__(self, row):
        guard.install(self.fetch_policy)
        return super().__call__(row)


class OutsidePart:
    """The shard ids a part's wandb logger should skip: other parts' shards and those done before."""

    def __init__(self, part: Part, done: set[int]):
        self.part, self.done = part, set(done)

    def __contains__(self, shard_id: int) -> bool:
        return shard_id in self.done or shard_id not in self.part.shard_ids
