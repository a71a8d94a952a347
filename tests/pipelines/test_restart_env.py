"""Every way we start torchrun gives its agents what restarts across nodes need (a fresh rendezvous
store per round), and GPU pods NCCL's async error handling; the two-agent fault tests in
tests/train/test_multinode.py run with exactly this environment."""

from __future__ import annotations

import sys

import pytest

from pipelines import launcher
from pipelines.presets import PRESETS
from pipelines.pytorchjob import NCCL_ENV, TORCHRUN_ENV, TrainJob, build_pytorchjob
from tests.conftest import REPO


def _env(job: TrainJob) -> dict[str, str]:
    spec = build_pytorchjob(job).spec.pytorch_replica_specs
    envs = [{e.name: e.value for e in r.template.spec.containers[0].env} for r in spec.values()]
    assert all(e == envs[0] for e in envs)
    return envs[0]


@pytest.mark.parametrize("preset", sorted(PRESETS), ids=lambda p: f"{p}-preset")  # "gpu" alone marks GPU tests
def test_every_pytorchjob_preset_gives_torchrun_a_fresh_store_per_round(preset):
    job = PRESETS[preset]().train
    env = _env(job)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert (env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "1") == bool(job.gpus_per_node)


def test_static_and_elastic_jobs_alike():
    for job in (TrainJob(nodes=2), TrainJob(nodes=3, elastic_min_nodes=1, gpus_per_node=8, procs_per_node=8)):
        env = _env(job)
        assert TORCHRUN_ENV.items() <= env.items()
    assert NCCL_ENV.items() <= env.items()


def test_torchx_component_sets_the_same_variables_and_keeps_the_users():
    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        import torchx_components
    finally:
        sys.path.remove(str(REPO / "pipelines"))
    app = torchx_components.train("--steps", "1", nnodes=2, env={"FOO": "bar"})
    assert torchx_components.TORCHRUN_ENV == TORCHRUN_ENV
    for role in app.roles:
        assert TORCHRUN_ENV.items() <= role.env.items() and role.env["FOO"] == "bar"


def test_local_launcher_passes_the_variables_to_torchrun(tmp_path):
    """The local launcher's torchrun, started for real: its worker sees the store of its own round."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys\nopen(sys.argv[1], 'w').write(os.environ['TORCHELASTIC_USE_AGENT_STORE'])\n")
    out = tmp_path / "out"
    cmd = launcher.torchrun_command([], nproc=1)
    cmd[cmd.index("--module"):] = [str(probe), str(out)]
    launcher.subprocess.run(cmd, env=launcher.torchrun_env(), check=True, timeout=120)
    assert out.read_text() == "False"  # False: not the agents' shared store
