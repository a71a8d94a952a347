"""Run the train stage: as a PyTorchJob on the cluster, or as torchrun on this machine.

Unlike Kubeflow's stock launcher component, which passes its job timeout as the per-request
timeout and so stops waiting after 600 s, this waits for the job's real deadline, streams the
master's logs while it runs, and fails with the operator's reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from pipelines.pytorchjob import METRICS_PORT, TORCHRUN_ENV, TrainJob, build_pytorchjob

CLEANUP_POLICIES = ("always", "on-success", "never")
DEADLINE_SLACK_S = 300  # lets the operator report DeadlineExceeded itself before we give up
MAX_API_ERRORS = 20  # over the whole wait; a multi-day job sees API restarts


class TrainJobFailed(RuntimeError):
    """The PyTorchJob failed, or did not finish by its deadline; the message says why."""


def job_name(run_id: str) -> str:
    """A DNS-1035 PyTorchJob name for a run id (run ids allow upper case and '_')."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"clipforge-train-{run_id}".lower())
    return name[:63].rstrip("-")


def cluster_train_job(run_id: str, train_args: list[str], gpus_per_node: int = 0, gpu_node_selector: str = "",
                      **params) -> TrainJob:
    """The pipeline's PyTorchJob: the step's train flags plus the device and a metrics port for pods.

    `gpu_node_selector` is `key=value,...`, applied when the job asks for GPUs.
    """
    device = ["--device", "cuda" if gpus_per_node else "cpu"]
    metrics = ["--metrics-port", str(METRICS_PORT), "--metrics-addr", "0.0.0.0"]
    selector = dict(pair.split("=", 1) for pair in gpu_node_selector.split(",") if pair) if gpus_per_node else {}
    return TrainJob(name=job_name(run_id), run_id=run_id, train_args=[*train_args, *device, *metrics],
                    gpus_per_node=gpus_per_node, node_selector=selector, **params)


def wait_seconds(job: TrainJob) -> int:
    return job.active_deadline_s + DEADLINE_SLACK_S


def failure_reason(job_obj) -> str:
    """'Reason: message' of the job's Failed condition, or '' when it did not fail."""
    for cond in (job_obj.status.conditions or []) if job_obj.status else []:
        if cond.type == "Failed" and cond.status == "True":
            return f"{cond.reason or 'Failed'}: {cond.message or 'no message'}"
    return ""


def _log_target(job: TrainJob) -> dict:
    """Static jobs have a Master pod; elastic ones only Workers, whose index 0 hosts the rendezvous."""
    if job.elastic:
        return {"is_master": False, "replica_type": "worker", "replica_index": 0}
    return {"is_master": True}


class _LogStreamer:
    """Follows the master's log from the first poll that sees it running; the SDK prints each line."""

    def __init__(self, client, job: TrainJob):
        self.client, self.job, self.thread = client, job, None

    def __call__(self, job_obj) -> None:
        if self.thread is not None or not _is_running(job_obj):
            return
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        try:
            self.client.get_job_logs(self.job.name, namespace=self.job.namespace, follow=True,
                                     **_log_target(self.job))
        except Exception as exc:  # logs are a convenience; the job's outcome decides the step
            print(f"clipforge launcher: log stream ended: {exc}", file=sys.stderr)

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=30)
            return
        try:  # finished between two polls: print what the master wrote
            logs, _ = self.client.get_job_logs(self.job.name, namespace=self.job.namespace,
                                               **_log_target(self.job))
            for pod, text in logs.items():
                for line in text.splitlines():
                    print(f"[Pod {pod}]: {line}")
        except Exception as exc:
            print(f"clipforge launcher: could not read the master's logs: {exc}", file=sys.stderr)


def _is_running(job_obj) -> bool:
    return any(c.type == "Running" and c.status == "True"
               for c in ((job_obj.status.conditions or []) if job_obj.status else []))


def run_pytorchjob(job: TrainJob, cleanup: str = "on-success", client=None, poll_s: int = 15,
                   log: Callable[[str], None] = print, max_api_errors: int = MAX_API_ERRORS):
    """Create the PyTorchJob, wait for Succeeded/Failed, stream logs, clean up; raise on failure."""
    if cleanup not in CLEANUP_POLICIES:
        raise ValueError(f"cleanup {cleanup!r}: one of {', '.join(CLEANUP_POLICIES)}")
    if client is None:
        from kubeflow.training import TrainingClient

        client = TrainingClient(namespace=job.namespace, job_kind="PyTorchJob")
    try:
        client.create_job(build_pytorchjob(job))
    except (RuntimeError, TimeoutError) as exc:
        raise TrainJobFailed(f"could not create PyTorchJob {job.namespace}/{job.name}: {exc}") from exc
    log(f"created PyTorchJob {job.namespace}/{job.name}; waiting up to {wait_seconds(job)} s")
    streamer = _LogStreamer(client, job)
    try:
        final = _wait(client, job, poll_s, streamer, log, max_api_errors)
    except TrainJobFailed:
        _cleanup(client, job, cleanup, succeeded=False, log=log)
        raise
    streamer.finish()
    reason = failure_reason(final)
    _cleanup(client, job, cleanup, succeeded=not reason, log=log)
    if reason:
        raise TrainJobFailed(f"PyTorchJob {job.namespace}/{job.name} failed: {reason}")
    log(f"PyTorchJob {job.namespace}/{job.name} succeeded")
    return final


def _wait(client, job: TrainJob, poll_s: int, callback, log, max_errors: int):
    """Until Succeeded/Failed or the job's deadline; a few API hiccups in a row do not end the wait."""
    deadline = time.monotonic() + wait_seconds(job)
    errors = 0
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            return client.wait_for_job_conditions(
                job.name, namespace=job.namespace, expected_conditions={"Succeeded", "Failed"},
                wait_timeout=max(poll_s, int(remaining)), polling_interval=poll_s, callback=callback)
        except (TimeoutError, RuntimeError) as exc:  # the SDK's errors for a get that failed or timed out
            if time.monotonic() >= deadline:
                break
            errors += 1
            if errors > max_errors:
                raise TrainJobFailed(f"lost the Kubernetes API while waiting for PyTorchJob "
                                     f"{job.namespace}/{job.name}: {exc}") from exc
            log(f"API error while waiting ({errors}/{max_errors}): {exc}")
            time.sleep(poll_s)
    raise TrainJobFailed(f"PyTorchJob {job.namespace}/{job.name} did not finish within {wait_seconds(job)} s")


def _cleanup(client, job: TrainJob, policy: str, succeeded: bool, log) -> None:
    if policy == "always" or (policy == "on-success" and succeeded):
        client.delete_job(job.name, namespace=job.namespace)
        log(f"deleted PyTorchJob {job.namespace}/{job.name} (cleanup={policy})")


def torchrun_command(train_args: list[str], nproc: int) -> list[str]:
    """torchrun on this machine, one node: the same `stages.train` command as in the pods."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--module", "stages.train", *train_args]


def torchrun_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment plus what torchrun's agent needs to restart cleanly."""
    return {**os.environ, **TORCHRUN_ENV, **(env or {})}


def run_torchrun_local(train_args: list[str], nproc: int = 1, env: dict | None = None) -> None:
    cmd = torchrun_command(train_args, nproc)
    print("running:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=torchrun_env(env))
    if result.returncode != 0:
        raise TrainJobFailed(f"torchrun exited with {result.returncode}: {' '.join(cmd)}")
