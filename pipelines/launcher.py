"""Run the train stage: as a PyTorchJob on the cluster, or as torchrun on this machine.

Unlike Kubeflow's stock launcher component, which passes its job timeout as the per-request
timeout and so stops waiting after 600 s, this

- waits for the job's real deadline and fails with the operator's reason;
- adopts the job a rerun of the same run finds (follows it while it runs, replaces a finished one so
  the new job resumes from LATEST), by `on_existing`;
- deletes the job when the step is terminated (SIGTERM/SIGINT) unless told to keep it, and makes the
  step's pod the job's owner when both live in one namespace, so the job goes with the pod;
- rides out API server outages up to `api_outage_s` in a row (the budget resets on each answer),
  and reports a job deleted under it as deleted;
- follows rank 0's log across container restarts and new pods (pipelines/joblogs.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from pipelines.launch_policy import check_launch, procs_for
from pipelines.pytorchjob import METRICS_PORT, TORCHRUN_ENV, TrainJob, build_pytorchjob
from pipelines.stage_args import plain

DEADLINE_SLACK_S = 300  # lets the operator report DeadlineExceeded itself before we give up
API_OUTAGE_S = 900  # a control-plane upgrade takes minutes; longer than this in a row fails the step
LAUNCH_KEYS = ("cleanup", "on_existing", "keep_on_cancel")


class TrainJobFailed(RuntimeError):
    """The PyTorchJob failed, or did not finish by its deadline; the message says why."""


class TrainJobCancelled(BaseException):
    """The step was told to stop (SIGTERM from Kubernetes when the run is terminated, or Ctrl-C).
    A BaseException, like KeyboardInterrupt, so that no `except Exception` around an API call
    swallows it."""


@dataclasses.dataclass
class Launch:
    """How the step treats its PyTorchJob, beside what the job is (TrainJob)."""

    cleanup: str = "on-success"
    on_existing: str = "adopt"
    keep_on_cancel: bool = False
    poll_s: float = 15
    api_outage_s: float = API_OUTAGE_S
    delete_wait_s: float = 300  # for a replaced job to be gone before its successor is created


def job_name(run_id: str) -> str:
    """A DNS-1035 PyTorchJob name for a run id (run ids allow upper case and '_')."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"clipforge-train-{run_id}".lower())
    return name[:63].rstrip("-")


def cluster_train_job(run_id: str, train_args: list[str], gpus_per_node: int = 0,
                      node_selector: dict[str, str] | None = None, **params) -> TrainJob:
    """The pipeline's PyTorchJob: the step's train flags plus the device and a metrics port for pods.
    `node_selector` applies when the job asks for GPUs."""
    device = ["--device", "cuda" if gpus_per_node else "cpu"]
    metrics = ["--metrics-port", str(METRICS_PORT), "--metrics-addr", "0.0.0.0"]
    return TrainJob(name=job_name(run_id), run_id=run_id, train_args=[*train_args, *device, *metrics],
                    gpus_per_node=int(gpus_per_node), node_selector=dict(node_selector or {}) if gpus_per_node else {},
                    **params)


def launch_training(launcher: str, run_id: str, train_args: list[str], job: dict) -> None:
    """The train step's body: `job` holds TrainJob fields and the Launch policies, by name."""
    job = {k: _node_selector(v) if k == "node_selector" else plain(v) for k, v in job.items()}
    launch = Launch(**{k: job.pop(k) for k in LAUNCH_KEYS if k in job})
    check_launch(launcher, launch.cleanup, launch.on_existing)
    job["procs_per_node"] = procs_for(job.get("gpus_per_node", 0), job.get("procs_per_node", 0))
    if launcher == "local":
        run_torchrun_local(train_args, nproc=job["procs_per_node"])
        return
    text = {"cpu", "memory", "shm_size"}  # "2" CPUs stays a quantity string
    fields = {k: (str(v) if k in text else v) for k, v in job.items()}
    run_pytorchjob(cluster_train_job(run_id, train_args, **fields), launch, owner=step_pod_owner())


def _node_selector(value) -> dict[str, str]:
    """The one node-selector format is a dict of labels; kfp may hand a nested dict over as JSON."""
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def wait_seconds(job: TrainJob) -> int:
    return job.active_deadline_s + DEADLINE_SLACK_S


def step_pod_owner(env=os.environ) -> dict | None:
    """The step's own pod (downward API env set by the pipeline), or None outside a pod."""
    if env.get("POD_NAME") and env.get("POD_UID"):
        return {"name": env["POD_NAME"], "uid": env["POD_UID"], "namespace": env.get("POD_NAMESPACE", "")}
    return None


def _owner_references(owner: dict | None, namespace: str) -> list[dict]:
    """A namespaced owner in another namespace counts as absent, and the garbage collector would
    delete the job at once: only an owner in the job's namespace is set."""
    if not owner or owner.get("namespace") != namespace:
        return []
    return [{"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"],
             "controller": False, "blockOwnerDeletion": False}]


def conditions(job_obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (job_obj.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"}


def failure_reason(job_obj: dict) -> str:
    """'Reason: message' of the job's Failed condition, or '' when it did not fail."""
    failed = conditions(job_obj).get("Failed")
    if failed is None:
        return ""
    return f"{failed.get('reason') or 'Failed'}: {failed.get('message') or 'no message'}"


def is_finished(job_obj: dict) -> bool:
    return bool({"Succeeded", "Failed"} & set(conditions(job_obj)))


class _CancelOnSignals:
    """SIGTERM/SIGINT raise TrainJobCancelled in the main thread, so the wait unwinds and cleans up."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, _frame):
        raise TrainJobCancelled(f"the step received {signal.Signals(signum).name}")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def run_pytorchjob(job: TrainJob, launch: Launch | None = None, configuration=None, owner: dict | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Create (or adopt) the PyTorchJob, follow its logs, wait for Succeeded/Failed, clean up."""
    from pipelines.jobapi import JobApi, api_client
    from pipelines.joblogs import LogFollower
    from pipelines.podspec import to_dict

    launch = launch or Launch()
    check_launch("pytorchjob", launch.cleanup, launch.on_existing)
    body = to_dict(build_pytorchjob(job))
    body["metadata"]["ownerReferences"] = _owner_references(owner, job.namespace) or None
    api = JobApi(api_client(configuration), job.name, job.namespace)
    where = f"PyTorchJob {job.namespace}/{job.name}"
    follower = None
    with _CancelOnSignals():
        try:
            _create_or_adopt(api, body, launch, where, log)
            log(f"waiting for {where} up to {wait_seconds(job)} s")
            follower = LogFollower(api, *_log_target(job), poll_s=min(launch.poll_s, 5), out=log).start()
            final = _wait(api, where, wait_seconds(job), launch, log)
        except TrainJobCancelled as exc:
            if launch.keep_on_cancel:
                log(f"{exc}; keeping {where} (keep_on_cancel)")
            else:
                _delete_quietly(api, where, log, why=str(exc))
            raise
        except TrainJobFailed:
            _cleanup(api, where, launch.cleanup, succeeded=False, log=log)
            raise
        finally:
            if follower is not None:
                follower.finish()
        reason = failure_reason(final)
        _cleanup(api, where, launch.cleanup, succeeded=not reason, log=log)
    if reason:
        raise TrainJobFailed(f"{where} failed: {reason}")
    log(f"{where} succeeded")
    return final


def _log_target(job: TrainJob) -> tuple[str, int]:
    """Static jobs have a Master pod; elastic ones only Workers, whose index 0 hosts the rendezvous."""
    return ("worker", 0) if job.elastic else ("master", 0)


def _create_or_adopt(api, body: dict, launch: Launch, where: str, log) -> None:
    from pipelines.jobapi import status_of

    try:
        api.create(body)
        log(f"created {where}")
        return
    except Exception as exc:
        if status_of(exc) != 409:
            raise TrainJobFailed(f"could not create {where}: {_brief(exc)}") from exc
    existing = _call(api.get, where, "read the existing")
    if launch.on_existing == "fail":
        raise TrainJobFailed(f"{where} already exists (on_existing=fail); delete it or rerun with "
                             "on_existing=adopt or replace")
    if launch.on_existing == "adopt" and not is_finished(existing):
        log(f"adopted the running {where} of this run (on_existing=adopt)")
        return
    state = "finished" if is_finished(existing) else "running"
    log(f"replacing the {state} {where}; the new job resumes from the run's LATEST checkpoint")
    _call(api.delete, where, "delete the existing")
    _wait_until_gone(api, where, launch)
    try:
        api.create(body)
    except Exception as exc:
        raise TrainJobFailed(f"could not create {where} again: {_brief(exc)}") from exc
    log(f"created {where}")


def _wait_until_gone(api, where: str, launch: Launch) -> None:
    from pipelines.jobapi import status_of

    give_up = time.monotonic() + launch.delete_wait_s
    while time.monotonic() < give_up:
        try:
            api.get()
        except Exception as exc:
            if status_of(exc) == 404:
                return
        time.sleep(min(launch.poll_s, 1))
    raise TrainJobFailed(f"{where} was still there {launch.delete_wait_s:.0f} s after deleting it")


def _call(fn, where: str, what: str):
    try:
        return fn()
    except Exception as exc:
        raise TrainJobFailed(f"could not {what} {where}: {_brief(exc)}") from exc


def _brief(exc: Exception) -> str:
    from pipelines.jobapi import status_of

    status = status_of(exc)
    reason = getattr(exc, "reason", "") or type(exc).__name__
    return f"HTTP {status} {reason}" if status else f"{reason}: {exc}"


def _wait(api, where: str, wait_s: float, launch: Launch, log):
    """Until Succeeded/Failed or the deadline. Transient API errors are tolerated for up to
    `api_outage_s` in a row; a 404 means someone deleted the job; other answers (403) fail at once."""
    from pipelines.jobapi import is_transient, status_of

    deadline = time.monotonic() + wait_s
    down_since, reported = None, 0.0
    while time.monotonic() < deadline:
        try:
            job_obj = api.get()
        except Exception as exc:
            if status_of(exc) == 404:
                raise TrainJobFailed(f"{where} was deleted while the step waited for it") from exc
            if not is_transient(exc):
                raise TrainJobFailed(f"the Kubernetes API refused to read {where}: {_brief(exc)}") from exc
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > launch.api_outage_s:
                raise TrainJobFailed(f"lost the Kubernetes API for {now - down_since:.0f} s (more than "
                                     f"api_outage_s={launch.api_outage_s:.0f}) while waiting for {where}: "
                                     f"{_brief(exc)}") from exc
            if now - reported >= 60 or reported < down_since:
                log(f"Kubernetes API unavailable for {now - down_since:.0f} s, still waiting: {_brief(exc)}")
                reported = now
        else:
            if down_since is not None:
                log(f"Kubernetes API back after {time.monotonic() - down_since:.0f} s")
            down_since = None
            if is_finished(job_obj):
                return job_obj
        time.sleep(launch.poll_s)
    raise TrainJobFailed(f"{where} did not finish within {wait_s:.0f} s")


def _delete_quietly(api, where: str, log, why: str) -> None:
    with contextlib.suppress(Exception):
        api.delete()
        log(f"{why}: deleted {where}")
        return
    log(f"{why}: could not delete {where}; delete it by hand")


def _cleanup(api, where: str, policy: str, succeeded: bool, log) -> None:
    if policy == "always" or (policy == "on-success" and succeeded):
        with contextlib.suppress(Exception):
            api.delete()
            log(f"deleted {where} (cleanup={policy})")


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
