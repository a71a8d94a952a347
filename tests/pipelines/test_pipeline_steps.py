"""Each pipeline step's stage command parses with the stage's real parser.

The step functions are the very source kfp ships into the containers; `extra_args` appends
`--check-config`, so each stage validates the command the step built and exits without working.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipelines import components

REPO = Path(__file__).resolve().parents[2]


def _make_shards():
    spec = importlib.util.spec_from_file_location("train_shards", REPO / "tests" / "train" / "shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_shards


def test_step_commands_pass_the_stages_config_check(s3, capfd):
    root = f"{s3}/runs"
    out = components.download(root=root, run_id="", url_list="", demo=True, demo_samples=100,
                              image_size=0, samples_per_shard=50, processes=1, threads=4,
                              extra_args="--check-config")
    run_id, data, demo_eval = out
    assert run_id and data == f"{root}/{run_id}/data" and demo_eval == f"demo={root}/{run_id}/evalsets/demo"
    assert '"demo": true' in capfd.readouterr().out

    _make_shards()(data, n_samples=16, samples_per_shard=8, image_size=32, val_samples=8)
    ckpt = components.train(
        root=root, run_id=run_id, train_data=data, model="clipforge-micro", batch_size=4, steps=5, epochs=1,
        lr=1e-3, warmup=1, precision="fp32", workers=0, save_every_steps=5, extra_args="--check-config",
        launcher="local", nodes=1, procs_per_node=1, gpus_per_node=0, cpu="1", memory="1Gi",
        shm_size="64Mi", train_image="", default_train_image="unused", image_pull_policy="IfNotPresent",
        namespace="clipforge", active_deadline_s=600, cleanup="on-success", gpu_node_selector="")
    assert ckpt == f"{root}/{run_id}/checkpoints/LATEST"
    assert '"steps": 5' in capfd.readouterr().out

    results = components.evaluate(root=root, run_id=run_id, checkpoint=ckpt, eval_data="", demo_eval=demo_eval,
                                  val_data=data, batch_size=8, workers=0, extra_args="--check-config")
    assert results == f"{root}/{run_id}/eval/results.json"
    assert f"{root}/{run_id}/evalsets/demo" in capfd.readouterr().out

    export = components.export(root=root, run_id=run_id, checkpoint=ckpt, push_to_hub="",
                               extra_args="--check-config")
    assert export == f"{root}/{run_id}/export"
    assert ckpt in capfd.readouterr().out
