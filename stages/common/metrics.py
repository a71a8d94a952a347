"""Prometheus metrics: one registry per process, HTTP exposition, optional Pushgateway push.

Names follow Prometheus conventions: `clipforge_<stage>_<what>_<unit>`, base units (seconds,
bytes), `_total` for counters. Long-running pods are scraped; batch stages also push at the end
(finished pods are not scraped), grouped by run id and stage, with a last-success timestamp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    pushadd_to_gateway,
    start_http_server,
)

log = logging.getLogger(__name__)


class StageMetrics:
    """A stage's metrics registry. Metric names get the `clipforge_<stage>_` prefix."""

    def __init__(self, stage: str, run_id: str, const_labels: dict[str, str] | None = None):
        self.stage = stage
        self.run_id = run_id
        self.registry = CollectorRegistry()
        self.prefix = f"clipforge_{stage.replace('-', '_')}_"
        self.const_labels = dict(const_labels or {})
        self._server = None
        self.last_success = self.gauge(
            "last_success_timestamp_seconds", "Unix time the stage last finished successfully")
        self.duration = self.gauge("duration_seconds", "Wall time of the stage so far")
        self._started = time.time()

    def _labels(self, labels: Sequence[str]) -> list[str]:
        return [*self.const_labels, *labels]

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        metric = Counter(self.prefix + name.removesuffix("_total"), doc, self._labels(labels),
                         registry=self.registry)
        return self._bind(metric, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._bind(Gauge(self.prefix + name, doc, self._labels(labels),
                                registry=self.registry), labels)

    def histogram(self, name: str, doc: str, buckets: Sequence[float],
                  labels: Sequence[str] = ()) -> Histogram:
        metric = Histogram(self.prefix + name, doc, self._labels(labels), buckets=buckets,
                           registry=self.registry)
        return self._bind(metric, labels)

    def _bind(self, metric, labels: Sequence[str]):
        """Pre-fill the constant labels so callers only give their own (if any)."""
        if not self.const_labels:
            return metric
        bound = metric.labels(**self.const_labels) if not labels else _PartialLabels(
            metric, self.const_labels)
        return bound

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP while the stage runs (port 0: off)."""
        if port:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", addr, port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def mark_success(self) -> None:
        self.duration.set(time.time() - self._started)
        self.last_success.set_to_current_time()

    def push(self, gateway: str) -> None:
        """Push everything to a Pushgateway, grouped by run id and stage. Never fails the stage."""
        if not gateway:
            return
        self.duration.set(time.time() - self._started)
        try:
            pushadd_to_gateway(gateway, job=f"clipforge_{self.stage}", registry=self.registry,
                               grouping_key={"run_id": self.run_id, "stage": self.stage},
                               timeout=10)
            log.info("pushed metrics to %s", gateway)
        except Exception as exc:  # noqa: BLE001 - monitoring must not fail a finished stage
            log.warning("could not push metrics to %s: %s", gateway, exc)


class _PartialLabels:
    """A labelled metric with the constant labels already filled in."""

    def __init__(self, metric, const_labels: dict[str, str]):
        self._metric = metric
        self._const = const_labels

    def labels(self, *args, **kwargs):
        if args:
            names = [n for n in self._metric._labelnames if n not in self._const]
            kwargs.update(zip(names, args, strict=False))  # positional args may fill fewer labels
        return self._metric.labels(**self._const, **kwargs)
