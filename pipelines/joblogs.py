"""Follow the log of a PyTorchJob's first pod across container restarts and replaced pods.

A thread watches the pod that hosts rank 0 (the Master; worker 0 of an elastic job). Each time that
pod's container starts again (restartPolicy OnFailure) or the operator makes a new pod, it streams
the new container's log; a Pending pod is waited for, not given up on. Lines are read in chunks and
printed as they come, so memory stays bounded however long the job runs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from pipelines.jobapi import JobApi
from pipelines.pytorchjob import CONTAINER

CHUNK_BYTES = 64 * 1024
MAX_LINE_BYTES = 16 * 1024  # longer lines are cut: one runaway line must not grow the buffer


def _container_state(pod: dict) -> tuple[int, bool, bool]:
    """(restart count, started, running) of the `pytorch` container."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            started = "running" in state or "terminated" in state
            return int(status.get("restartCount") or 0), started, "running" in state
    return 0, False, False


class LogFollower:
    def __init__(self, api: JobApi, replica_type: str = "master", index: int = 0, poll_s: float = 5,
                 out: Callable[[str], None] = print):
        self.api, self.replica_type, self.index, self.poll_s, self.out = api, replica_type, index, poll_s, out
        self._stop = threading.Event()
        self._done: set[tuple[str, int]] = set()  # (pod uid, restart count) streamed to the end
        self._resume_s: dict[tuple[str, int], int] = {}
        self._last_line_at = 0.0
        self._thread = threading.Thread(target=self._run, name="pytorchjob-logs", daemon=True)

    def start(self) -> LogFollower:
        self._thread.start()
        return self

    def finish(self, timeout_s: float = 30) -> None:
        """The job has ended: stream what is left of the last container, then stop."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                streamed = self._stream_next()
            except Exception as exc:  # logs are a convenience; the job's outcome decides the step
                print(f"clipforge launcher: reading the job's logs failed, retrying: {exc}", file=sys.stderr)
                streamed = False
            if stopping:
                return
            if not streamed:
                self._stop.wait(self.poll_s)

    def _stream_next(self) -> bool:
        """Stream the target container if it has output not yet streamed; False when there is none."""
        pod = self._target()
        if pod is None:
            return False
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        restarts, started, _ = _container_state(pod)
        key = (uid, restarts)
        if not started or key in self._done:
            return False
        self._follow(name, since_s=self._resume_s.get(key))
        after = self._target()
        if after is not None and after["metadata"]["uid"] == uid and _container_state(after)[:3:2] == (restarts, True):
            # the stream broke while the container runs: reconnect from about where it stopped
            self._resume_s[key] = int(time.time() - self._last_line_at) + 1
        else:
            self._done.add(key)
        return True

    def _target(self) -> dict | None:
        """The newest pod of the replica (the operator replaces a deleted or evicted one)."""
        pods = self.api.pods(self.replica_type, self.index)
        return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "") if pods else None

    def _follow(self, pod: str, since_s: int | None) -> None:
        response = self.api.log_stream(pod, CONTAINER, since_s=since_s)
        partial = b""
        try:
            for chunk in response.stream(CHUNK_BYTES, decode_content=True):
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()[:MAX_LINE_BYTES]
                for line in lines:
                    self._emit(pod, line)
            if partial:
                self._emit(pod, partial)
        finally:
            response.release_conn()

    def _emit(self, pod: str, line: bytes) -> None:
        self._last_line_at = time.time()
        self.out(f"[{pod}] {line[:MAX_LINE_BYTES].decode('utf-8', 'replace')}")
