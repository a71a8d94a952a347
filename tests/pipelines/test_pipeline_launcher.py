"""The PyTorchJob launcher, through the real `kubernetes` client, against a STAND-IN API server.

No Kubernetes API server can run on this machine, so `tests/pipelines/k8s_standin.py` serves the
REST paths the launcher calls on 127.0.0.1 and the tests play the training operator's part.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from pipelines.launch_policy import procs_for
from pipelines.launcher import (
    DEADLINE_SLACK_S,
    Launch,
    TrainJobFailed,
    failure_reason,
    job_name,
    run_pytorchjob,
    run_torchrun_local,
    torchrun_command,
    wait_seconds,
)
from pipelines.pytorchjob import TrainJob, build_pytorchjob
from tests.pipelines.k8s_standin import StandInApiServer

REPO = Path(__file__).resolve().parents[2]
FAST = dict(poll_s=0.05, delete_wait_s=5)


@pytest.fixture
def api():
    with StandInApiServer() as server:
        yield server


def _job(**kw) -> TrainJob:
    return TrainJob(name="clipforge-train-r1", run_id="r1", train_args=["--train-data", "x"], **kw)


class _Launch(threading.Thread):
    """run_pytorchjob in a thread, as the step would; `result` is its return value or exception."""

    def __init__(self, api, launch: Launch, job: TrainJob | None = None, **kw):
        super().__init__(daemon=True)
        self.api, self.launch, self.job, self.kw = api, launch, job or _job(), kw
        self.lines: list[str] = []
        self.result = None

    def run(self):
        try:
            self.result = run_pytorchjob(self.job, self.launch, configuration=self.api.configuration(),
                                         log=self.lines.append, **self.kw)
        except Exception as exc:
            self.result = exc

    def finished(self, timeout: float = 20):
        self.join(timeout)
        assert not self.is_alive(), self.lines
        return self.result


def _until(predicate, timeout: float = 10) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.02)


def test_a_rerun_adopts_the_running_job_of_its_run(api):
    api.put_job("clipforge-train-r1", "Created", "Running")
    run = _Launch(api, Launch(**FAST))
    run.start()
    _until(lambda: len(api.calls("GET")) >= 3)
    api.set_condition("clipforge-train-r1", "Succeeded")
    assert isinstance(run.finished(), dict)
    assert api.calls("POST") == [409]  # tried to create, found it, followed it
    assert any("adopted the running PyTorchJob clipforge/clipforge-train-r1" in line for line in run.lines)
    assert api.calls("DELETE") == [200]  # cleanup=on-success after it succeeded


@pytest.mark.parametrize("state", ["Failed", "Succeeded"])
def test_a_rerun_replaces_a_finished_job_so_training_resumes(api, state):
    old_uid = api.put_job("clipforge-train-r1", "Created", state)["metadata"]["uid"]
    run = _Launch(api, Launch(cleanup="never", **FAST))
    run.start()
    _until(lambda: api.jobs.get("clipforge-train-r1", {}).get("metadata", {}).get("uid") not in (None, old_uid))
    api.set_condition("clipforge-train-r1", "Succeeded")
    run.finished()
    assert api.calls("POST") == [409, 201] and api.calls("DELETE") == [200]
    assert any("replacing the finished" in line and "resumes from the run's LATEST" in line for line in run.lines)


def test_on_existing_fail_refuses_and_leaves_the_job(api):
    api.put_job("clipforge-train-r1", "Created", "Running")
    result = _Launch(api, Launch(on_existing="fail", cleanup="never", **FAST))
    result.start()
    exc = result.finished()
    assert isinstance(exc, TrainJobFailed) and "already exists (on_existing=fail)" in str(exc)
    assert "clipforge-train-r1" in api.jobs


def test_a_job_deleted_mid_wait_is_reported_as_deleted(api):
    run = _Launch(api, Launch(cleanup="never", **FAST))
    run.start()
    _until(lambda: "clipforge-train-r1" in api.jobs)
    api.set_condition("clipforge-train-r1", "Running")
    del api.jobs["clipforge-train-r1"]
    exc = run.finished()
    assert isinstance(exc, TrainJobFailed)
    assert "was deleted while the step waited" in str(exc) and "lost the Kubernetes API" not in str(exc)


def test_api_outages_within_the_budget_are_ridden_out_and_the_budget_resets(api):
    # scaled down: a 1.5 s budget stands for minutes; two 1 s outages add up to more than the
    # budget, and each alone is within it, so only a budget that resets on success passes
    run = _Launch(api, Launch(api_outage_s=1.5, **FAST))
    run.start()
    _until(lambda: "clipforge-train-r1" in api.jobs)
    for _ in range(2):
        api.down_for(1.0)
        time.sleep(1.0 + 0.3)
    api.set_condition("clipforge-train-r1", "Succeeded")
    assert isinstance(run.finished(), dict), run.lines
    assert api.calls("GET").count(503) > 20  # the old launcher gave up after 20 errors in all
    assert sum("Kubernetes API back after" in line for line in run.lines) == 2


def test_an_outage_longer_than_the_budget_fails_the_step_clearly(api):
    run = _Launch(api, Launch(api_outage_s=0.5, cleanup="never", **FAST))
    run.start()
    _until(lambda: "clipforge-train-r1" in api.jobs)
    api.down_for(30)
    exc = run.finished()
    assert isinstance(exc, TrainJobFailed)
    assert "lost the Kubernetes API for" in str(exc) and "api_outage_s=0" in str(exc) and "503" in str(exc)


def test_logs_follow_a_pending_pod_its_restarts_and_its_replacement(api):
    run = _Launch(api, Launch(cleanup="never", **FAST))
    run.start()
    _until(lambda: "clipforge-train-r1" in api.jobs)
    pod = api.add_pod("clipforge-train-r1")  # Pending while the job already runs
    api.set_condition("clipforge-train-r1", "Running")
    time.sleep(0.3)
    api.start_container(pod)
    api.write_log(pod, "step 1", "step 2")
    _until(lambda: any("step 2" in line for line in run.lines))
    api.stop_container(pod, exit_code=1)  # the rank crashed; restartPolicy OnFailure restarts it
    time.sleep(0.2)
    api.start_container(pod)
    api.write_log(pod, "resumed at step 2", "step 3")
    _until(lambda: any("step 3" in line for line in run.lines))
    api.delete_pod(pod)  # evicted; the operator makes a new master pod
    new_pod = api.add_pod("clipforge-train-r1")
    api.start_container(new_pod)
    api.write_log(new_pod, "resumed at step 3", "step 4 done")
    api.stop_container(new_pod)
    api.set_condition("clipforge-train-r1", "Succeeded")
    run.finished()
    logged = [line for line in run.lines if line.startswith("[")]
    assert logged == [f"[{pod}] step 1", f"[{pod}] step 2", f"[{pod}] resumed at step 2", f"[{pod}] step 3",
                      f"[{new_pod}] resumed at step 3", f"[{new_pod}] step 4 done"]


def test_the_job_is_owned_by_the_steps_pod_only_in_its_namespace(api):
    owner = {"name": "clipforge-train-step", "uid": "1234", "namespace": "clipforge"}
    run = _Launch(api, Launch(cleanup="never", **FAST), owner=owner)
    run.start()
    _until(lambda: "clipforge-train-r1" in api.jobs)
    (ref,) = api.jobs["clipforge-train-r1"]["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "v1", "kind": "Pod", "name": "clipforge-train-step", "uid": "1234",
                   "controller": False, "blockOwnerDeletion": False}
    api.set_condition("clipforge-train-r1", "Succeeded")
    run.finished()

    # a step pod in the KFP namespace cannot own it: the garbage collector would delete the job at once
    del api.jobs["clipforge-train-r1"]
    run = _Launch(api, Launch(cleanup="never", **FAST), owner=dict(owner, namespace="kubeflow"))
    run.start()
    _until(lambda: "clipforge-train-r1" in api.jobs)
    assert not api.jobs["clipforge-train-r1"]["metadata"].get("ownerReferences")
    api.set_condition("clipforge-train-r1", "Succeeded")
    run.finished()


_STEP = """
import sys
from kubernetes import client as k8s
from pipelines.launcher import Launch, run_pytorchjob
from pipelines.pytorchjob import TrainJob
cfg = k8s.Configuration(); cfg.host = sys.argv[1]; cfg.retries = 0
job = TrainJob(name="clipforge-train-r1", run_id="r1", train_args=["--train-data", "x"])
run_pytorchjob(job, Launch(poll_s=0.05, keep_on_cancel=sys.argv[2] == "keep"), configuration=cfg,
               log=lambda line: print(line, flush=True))
"""


@pytest.mark.parametrize("sig, keep", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)])
def test_terminating_the_step_deletes_its_job(api, cli_env, sig, keep):
    proc = subprocess.Popen([sys.executable, "-c", _STEP, api.url, "keep" if keep else "delete"], cwd=REPO,
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _until(lambda: "clipforge-train-r1" in api.jobs and len(api.calls("GET")) >= 2, timeout=60)
        api.set_condition("clipforge-train-r1", "Running")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert f"received {sig.name}" in out
    if keep:
        assert "keeping PyTorchJob clipforge/clipforge-train-r1" in out and "clipforge-train-r1" in api.jobs
    else:
        assert "deleted PyTorchJob clipforge/clipforge-train-r1" in out and api.jobs == {}


def test_unreachable_api_server_fails_the_step_with_a_clear_reason():
    from tests.conftest import free_port

    cfg = k8s.Configuration()
    cfg.host, cfg.retries = f"http://127.0.0.1:{free_port()}", 0
    with pytest.raises(TrainJobFailed, match="could not create PyTorchJob clipforge/t"):
        run_pytorchjob(TrainJob(name="t", train_args=["--train-data", "x"]), Launch(poll_s=0.05),
                       configuration=cfg, log=lambda _: None)


def test_waits_for_the_jobs_own_deadline_not_600_seconds():
    job = TrainJob(active_deadline_s=3 * 3600)
    assert wait_seconds(job) == 3 * 3600 + DEADLINE_SLACK_S
    assert build_pytorchjob(job).spec.run_policy.active_deadline_seconds == 3 * 3600


def test_failure_reason_is_the_operators_failed_condition(api):
    api.put_job("t", "Created", "Running")
    api.set_condition("t", "Failed", "DeadlineExceeded", "PyTorchJob clipforge/t has failed: deadline exceeded")
    assert failure_reason(api.jobs["t"]) == "DeadlineExceeded: PyTorchJob clipforge/t has failed: deadline exceeded"
    assert failure_reason(api.put_job("u", "Created", "Succeeded")) == ""


def test_a_failed_job_fails_the_step_with_that_reason_and_is_kept(api):
    run = _Launch(api, Launch(**FAST))
    run.start()
    _until(lambda: "clipforge-train-r1" in api.jobs)
    api.set_condition("clipforge-train-r1", "Failed", "BackoffLimitExceeded", "master exited with 1")
    exc = run.finished()
    assert str(exc) == ("PyTorchJob clipforge/clipforge-train-r1 failed: BackoffLimitExceeded: "
                        "master exited with 1")
    assert "clipforge-train-r1" in api.jobs  # cleanup=on-success keeps a failed job for inspection


@pytest.mark.parametrize("bad", [dict(name="Train_Job"), dict(nodes=0), dict(elastic_min_nodes=5, nodes=4),
                                 dict(gpus_per_node=8, procs_per_node=4)])
def test_bad_job_parameters_are_refused_before_anything_is_created(bad):
    with pytest.raises(ValueError):
        build_pytorchjob(TrainJob(**bad))


def test_processes_per_node_default_to_gpus_per_node_and_a_mismatch_is_an_error():
    assert procs_for(gpus_per_node=8, procs_per_node=0) == 8
    assert procs_for(gpus_per_node=0, procs_per_node=0) == 1
    assert procs_for(gpus_per_node=0, procs_per_node=2) == 2
    with pytest.raises(ValueError, match="procs_per_node=4 but gpus_per_node=8"):
        procs_for(gpus_per_node=8, procs_per_node=4)


def test_job_names_are_dns_labels_of_the_run_id():
    assert job_name("Run_2024.01") == "clipforge-train-run-2024-01"
    assert len(job_name("x" * 100)) <= 63


def test_elastic_jobs_have_workers_only_and_static_jobs_one_master():
    elastic = build_pytorchjob(TrainJob(nodes=4, elastic_min_nodes=2)).spec
    assert set(elastic.pytorch_replica_specs) == {"Worker"} and elastic.elastic_policy.min_replicas == 2
    static = build_pytorchjob(TrainJob(nodes=3)).spec
    assert static.pytorch_replica_specs["Master"].replicas == 1
    assert static.pytorch_replica_specs["Worker"].replicas == 2


def test_gpu_jobs_request_gpus_and_tolerate_gpu_taints():
    pod = build_pytorchjob(TrainJob(gpus_per_node=8, procs_per_node=8)).spec.pytorch_replica_specs["Master"]
    assert pod.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"
    assert pod.template.spec.tolerations == [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists",
                                                              effect="NoSchedule")]


def test_queue_gang_scheduling_and_priority_class():
    job = build_pytorchjob(TrainJob(nodes=4, elastic_min_nodes=2, queue_name="team-a", priority_class="high",
                                    gang_scheduling=True))
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    policy = job.spec.run_policy.scheduling_policy
    assert policy.min_available == 2 and policy.priority_class == "high"
    assert job.spec.pytorch_replica_specs["Worker"].template.spec.priority_class_name == "high"
    plain = build_pytorchjob(TrainJob())
    assert plain.spec.run_policy.scheduling_policy is None and "kueue.x-k8s.io/queue-name" not in plain.metadata.labels


def test_local_launch_is_the_same_stage_command_under_torchrun():
    cmd = torchrun_command(["--steps", "3"], nproc=2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[-4:] == ["--module", "stages.train", "--steps", "3"]
    help_run = subprocess.run(cmd[:-4] + ["--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0  # torchrun accepts its own flags as written


def test_local_launch_fails_with_the_stages_exit_status(tmp_path):
    with pytest.raises(TrainJobFailed, match="exited with"):
        run_torchrun_local(["--train-data", str(tmp_path / "missing"), "--root", str(tmp_path)],
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
