"""Each pipeline step's stage command parses with the stage's real parser, and the steps' own work.

The step functions are the very source kfp ships into the containers; `extra_args` appends
`--check-config`, so each stage validates the command the step built and exits without working.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kfp.dsl import Markdown, Metrics

from pipelines import components
from pipelines.results import eval_markdown, numeric_metrics
from pipelines.stage_args import flags, train_argv

REPO = Path(__file__).resolve().parents[2]


def _make_shards():
    spec = importlib.util.spec_from_file_location("train_shards", REPO / "tests" / "train" / "shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_shards


def test_step_commands_pass_the_stages_config_check(s3, capfd, tmp_path):
    root = f"{s3}/runs"
    planned = components.plan(root=root, run_id="", demo=True, url_list="", download_tasks=1, launcher="local",
                              gpus_per_node=0, procs_per_node=0, cleanup="on-success", on_existing="adopt")
    run_id = planned.run_id
    assert run_id and planned.procs_per_node == 1 and planned.eval_gpus == 0
    # kfp hands dict inputs over with their values as text: the argv must not care
    options = {"url_list": "", "demo": "true", "demo_samples": "100.0", "image_size": "0.0",
               "samples_per_shard": "50.0", "processes": "1.0", "threads": "4.0"}
    (part,) = components.download_parts(root=root, run_id=run_id, num_parts=1, options=options,
                                        extra_args="--check-config")
    assert components.download(part=part) == "0"
    assert '"demo": true' in capfd.readouterr().out
    data, demo_eval = components.merge_downloads(root=root, run_id=run_id, num_parts=1, parts=["0"], demo=True)
    assert data == f"{root}/{run_id}/data" and demo_eval == f"demo={root}/{run_id}/evalsets/demo"

    _make_shards()(data, n_samples=16, samples_per_shard=8, image_size=32, val_samples=8)
    ckpt = components.train(
        root=root, run_id=run_id, train_data=data, extra_args="--check-config", launcher="local",
        default_image="unused",
        options={"model": "clipforge-micro", "batch_size": "4.0", "steps": "5.0", "epochs": "1.0", "lr": "0.001",
                 "warmup": "1.0", "precision": "fp32", "workers": "0.0", "save_every_steps": "5.0"},
        job={"nodes": "1.0", "procs_per_node": "1", "gpus_per_node": "0.0", "cpu": "1", "memory": "1Gi",
             "cleanup": "on-success", "on_existing": "adopt", "keep_on_cancel": "false"})
    assert ckpt == f"{root}/{run_id}/checkpoints/LATEST"
    assert '"steps": 5' in capfd.readouterr().out

    from tests.evaluate.evalkit import write_classification_set

    write_classification_set(demo_eval.split("=", 1)[1])  # --check-config reads its first samples
    metrics, table = Metrics(name="m", uri=str(tmp_path / "m")), Markdown(name="t", uri=str(tmp_path / "t"))
    results = components.evaluate(root=root, run_id=run_id, checkpoint=ckpt, eval_data="", demo_eval=demo_eval,
                                  val_data=data, options={"batch_size": "8.0", "workers": "0.0"},
                                  extra_args="--check-config", metrics=metrics, table=table)
    assert results == f"{root}/{run_id}/eval/results.json"
    assert f"{root}/{run_id}/evalsets/demo" in capfd.readouterr().out

    export = components.export(root=root, run_id=run_id, checkpoint=ckpt, options={"push_to_hub": ""},
                               extra_args="--check-config", model=None)
    assert export == f"{root}/{run_id}/export"
    assert ckpt in capfd.readouterr().out


def test_eval_results_become_kfp_metrics_and_a_markdown_table():
    results = {"datasets": {"demo": {"task": "zeroshot_classification", "samples": 600,
                                     "metrics": {"acc1": 0.97, "acc5": 1}},
                            "val": {"task": "zeroshot_retrieval", "samples": 100,
                                    "metrics": {"image_retrieval_recall@1": 0.41, "note": "n/a"}}}}
    assert numeric_metrics(results) == {"demo/acc1": 0.97, "demo/acc5": 1.0, "val/image_retrieval_recall@1": 0.41}
    text = eval_markdown(results)
    assert "| demo | zeroshot_classification | 600 | acc1 | 0.9700 |" in text
    assert "| val | zeroshot_retrieval | 100 | note | n/a |" in text


def test_stage_options_become_the_stages_own_flags():
    assert flags({"batch_size": 64, "local_loss": True, "gather_with_grad": False, "image_size": "",
                  "lr": 5e-4, "eval_data": ["a=1", "b=2"], "demo": "true", "steps": "800.0"}) == [
        "--batch-size", "64", "--local-loss", "--lr", "0.0005", "--eval-data", "a=1", "b=2", "--demo",
        "--steps", "800"]
    argv = train_argv("s3://b/runs", "r", "s3://b/runs/r/data", {"steps": 0, "epochs": 3, "model": "ViT-B-32"})
    assert argv == ["--root", "s3://b/runs", "--run-id", "r", "--train-data", "s3://b/runs/r/data",
                    "--epochs", "3", "--model", "ViT-B-32", "--resume", "latest"]
