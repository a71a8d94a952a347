"""The download stage's Prometheus metrics (names fixed by docs/CONTRACTS.md)."""

from __future__ import annotations

from stages.common.metrics import StageMetrics
from stages.download.shards import ShardStats


class DownloadMetrics:
    def __init__(self, run_id: str):
        self.stage = StageMetrics("download", run_id, const_labels={"run_id": run_id})
        m = self.stage
        self.attempted = m.counter("images_attempted_total", "Images img2dataset tried to download")
        self.succeeded = m.counter("images_succeeded_total", "Images written into shards")
        self.failed = m.counter("images_failed_total", "Images that failed, by reason", ["reason"])
        self.bytes = m.counter("bytes_total", "Bytes of shard tars written")
        self.shards = m.counter("shards_total", "Shards completed")
        self.success_ratio = m.gauge("success_ratio", "Succeeded / attempted so far")
        self.images_per_s = m.gauge("images_per_second", "Successful images per second of wall time")
        self._attempted = self._succeeded = 0

    def add_shard(self, stats: ShardStats, tar_bytes: int) -> None:
        self.attempted.inc(stats.attempted)
        self.succeeded.inc(stats.succeeded)
        for reason, n in stats.failures.items():
            self.failed.labels(reason=reason).inc(n)
        self.bytes.inc(tar_bytes)
        self.shards.inc()
        self._attempted += stats.attempted
        self._succeeded += stats.succeeded
        self.success_ratio.set(self._succeeded / max(self._attempted, 1))

    def set_rate(self, images: int, elapsed_s: float) -> None:
        self.images_per_s.set(images / max(elapsed_s, 1e-9))
