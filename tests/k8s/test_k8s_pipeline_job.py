"""The PyTorchJob the pipeline's train step creates is one the operator accepts."""

from __future__ import annotations

import jsonschema
from k8skit import pytorchjob_schema, webhook_errors

from pipelines.launcher import cluster_train_job
from pipelines.podspec import to_dict
from pipelines.pytorchjob import build_pytorchjob


def _pipeline_job(**kw):
    params = dict(image="registry.example.com/clipforge-train:v1", image_pull_policy="Always",
                  namespace="team-a", nodes=3, procs_per_node=1, cpu="2", memory="4Gi", shm_size="1Gi",
                  active_deadline_s=7200)
    params.update(kw)
    return to_dict(build_pytorchjob(cluster_train_job(
        "20261122-060000-Ab_C", ["--root", "s3://b/runs", "--train-data", "s3://b/runs/x/data"], **params)))


def test_pipeline_jobs_pass_the_crd_schema_and_webhook_rules(schemas_dir):
    schema = pytorchjob_schema(schemas_dir)
    for job in (_pipeline_job(), _pipeline_job(gpus_per_node=4, procs_per_node=4,
                                               node_selector={"nvidia.com/gpu.present": "true"}),
                _pipeline_job(queue_name="team-a", priority_class="high", gang_scheduling=True)):
        jsonschema.validate(job, schema)
        assert webhook_errors(job) == []
        assert job["metadata"]["name"] == "clipforge-train-20261122-060000-ab-c"
        assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200


def test_gpu_pipeline_jobs_land_on_gpu_nodes_with_cuda():
    job = _pipeline_job(gpus_per_node=4, procs_per_node=4, node_selector={"nvidia.com/gpu.present": "true"})
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    argv = pod["containers"][0]["command"]
    assert argv[argv.index("--device") + 1] == "cuda"
    cpu_pod = _pipeline_job(node_selector={"nvidia.com/gpu.present": "true"})["spec"]["pytorchReplicaSpecs"]["Master"]
    assert "nodeSelector" not in cpu_pod["template"]["spec"]
