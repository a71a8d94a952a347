"""The PyTorchJob launcher's decisions: how long it waits, what failure it reports, what it runs locally."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kubeflow.training import models as kf
from kubernetes import client as k8s

from pipelines.launcher import (
    DEADLINE_SLACK_S,
    TrainJobFailed,
    _wait,
    failure_reason,
    run_pytorchjob,
    run_torchrun_local,
    torchrun_command,
    wait_seconds,
)
from pipelines.pytorchjob import TrainJob, build_pytorchjob


def _job_with(*conditions) -> kf.KubeflowOrgV1PyTorchJob:
    job = build_pytorchjob(TrainJob(name="t", train_args=["--train-data", "x"]))
    job.status = kf.KubeflowOrgV1JobStatus(conditions=[
        kf.KubeflowOrgV1JobCondition(type=t, status="True", reason=r, message=m) for t, r, m in conditions])
    return job


def test_waits_for_the_jobs_own_deadline_not_600_seconds():
    job = TrainJob(active_deadline_s=3 * 3600)
    assert wait_seconds(job) == 3 * 3600 + DEADLINE_SLACK_S
    spec = build_pytorchjob(job).spec
    assert spec.run_policy.active_deadline_seconds == 3 * 3600


def test_failure_reason_is_the_operators_failed_condition():
    failed = _job_with(("Created", "PyTorchJobCreated", ""), ("Running", "PyTorchJobRunning", ""),
                       ("Failed", "DeadlineExceeded", "PyTorchJob clipforge/t has failed: deadline exceeded"))
    assert failure_reason(failed) == "DeadlineExceeded: PyTorchJob clipforge/t has failed: deadline exceeded"
    succeeded = _job_with(("Created", "PyTorchJobCreated", ""), ("Succeeded", "PyTorchJobSucceeded", "done"))
    assert failure_reason(succeeded) == ""


@pytest.mark.parametrize("bad", [dict(name="Train_Job"), dict(nodes=0), dict(elastic_min_nodes=5, nodes=4)])
def test_bad_job_parameters_are_refused_before_anything_is_created(bad):
    with pytest.raises(ValueError):
        build_pytorchjob(TrainJob(**bad))


def test_elastic_jobs_have_workers_only_and_static_jobs_one_master():
    elastic = build_pytorchjob(TrainJob(nodes=4, elastic_min_nodes=2)).spec
    assert set(elastic.pytorch_replica_specs) == {"Worker"} and elastic.elastic_policy.min_replicas == 2
    static = build_pytorchjob(TrainJob(nodes=3)).spec
    assert static.pytorch_replica_specs["Master"].replicas == 1
    assert static.pytorch_replica_specs["Worker"].replicas == 2


def test_gpu_jobs_request_gpus_and_tolerate_gpu_taints():
    pod = build_pytorchjob(TrainJob(gpus_per_node=8, procs_per_node=8)).spec.pytorch_replica_specs["Master"]
    container = pod.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    assert pod.template.spec.tolerations == [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists",
                                                              effect="NoSchedule")]


def test_local_launch_is_the_same_stage_command_under_torchrun():
    cmd = torchrun_command(["--steps", "3"], nproc=2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[-4:] == ["--module", "stages.train", "--steps", "3"]
    help_run = subprocess.run(cmd[:-4] + ["--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0  # torchrun accepts its own flags as written


def test_local_launch_fails_with_the_stages_exit_status(tmp_path):
    with pytest.raises(TrainJobFailed, match="exited with"):
        run_torchrun_local(["--train-data", str(tmp_path / "missing"), "--root", str(tmp_path)])


def _client_for_a_dead_api_server():
    """A real TrainingClient aimed at a loopback port nobody listens on."""
    from kubeflow.training import TrainingClient

    from tests.conftest import free_port

    cfg = k8s.Configuration()
    cfg.host = f"http://127.0.0.1:{free_port()}"
    cfg.retries = 0
    return TrainingClient(client_configuration=cfg, namespace="clipforge")


def test_unreachable_api_server_fails_the_step_with_a_clear_reason():
    client = _client_for_a_dead_api_server()
    with pytest.raises(TrainJobFailed, match="could not create PyTorchJob clipforge/t"):
        run_pytorchjob(TrainJob(name="t", train_args=["--train-data", "x"]), client=client)


def test_waiting_gives_up_after_repeated_api_errors():
    client = _client_for_a_dead_api_server()
    lines = []
    with pytest.raises(TrainJobFailed, match="lost the Kubernetes API"):
        _wait(client, TrainJob(name="t"), poll_s=1, callback=None, log=lines.append, max_errors=2)
    assert len(lines) == 2 and "API error while waiting (1/2)" in lines[0]
