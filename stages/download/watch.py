"""Follow a running img2dataset: each newly completed shard updates metrics and the progress bar."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Container, Iterator

from stages.common.logs import progress
from stages.download import shards


class ShardWatcher:
    """A thread that polls the data folder for new `_stats.json` files and reports each once."""

    def __init__(self, data_dir: str, total_shards: int, seen: set[int],
                 on_shard: Callable[[int, str], None], log: logging.Logger, poll_s: float = 1.0,
                 owned: Container[int] | None = None):
        self.data_dir, self.total, self.seen = data_dir, total_shards, set(seen)
        self.owned = owned  # other parts' shards in the same folder are not ours to report
        self.on_shard, self.log, self.poll_s = on_shard, log, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard-watcher", daemon=True)

    def __enter__(self) -> ShardWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _new_shards(self) -> Iterator[tuple[int, str]]:
        while True:
            stopping = self._stop.is_set()
            try:
                found = shards.stats_uris(self.data_dir)
            except Exception as exc:  # noqa: BLE001 - a failed poll only delays the display
                self.log.debug("polling %s: %s", self.data_dir, exc)
                found = {}
            mine = (s for s in found if self.owned is None or s in self.owned)
            for shard_id in sorted(set(mine) - self.seen):
                self.seen.add(shard_id)
                yield shard_id, found[shard_id]
            if stopping:
                return
            self._stop.wait(self.poll_s)

    def _run(self) -> None:
        todo = max(self.total - len(self.seen), 0)
        for shard_id, uri in progress(self._new_shards(), total=todo, desc="shards", log=self.log,
                                      every_s=10.0):
            try:
                self.on_shard(shard_id, uri)
            except Exception as exc:  # noqa: BLE001 - metrics must not break the download
                self.log.warning("could not read %s: %s", uri, exc)
