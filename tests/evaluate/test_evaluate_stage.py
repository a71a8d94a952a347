"""The evaluate command end to end: stores, outputs, metrics push, val split, ranks under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from evalkit import tar_bytes, write_classification_set, write_retrieval_set, write_winogavil_cache

from stages.common import storage
from stages.evaluate.cli import main
from tests.conftest import free_port, wait_for_port, which


def _results(uri: str) -> dict:
    return storage.read_json(uri)


def test_s3_and_local_eval_sets_give_the_same_results(micro_run, tmp_path, s3):
    local_set, s3_set = str(tmp_path / "colours"), f"{s3}/evalsets/colours"
    write_classification_set(local_set)
    write_classification_set(s3_set)
    out_local, out_s3 = str(tmp_path / "local.json"), f"{s3}/eval/results.json"
    for eval_set, out in ((local_set, out_local), (s3_set, out_s3)):
        assert main(["--checkpoint", micro_run, "--eval-data", f"colours={eval_set}", "--root", str(tmp_path),
                     "--run-id", "r", "--workers", "2", "--output", out]) == 0
    local, remote = _results(out_local)["datasets"]["colours"], _results(out_s3)["datasets"]["colours"]
    assert local["samples"] == remote["samples"] == 24
    assert local["metrics"] == remote["metrics"]
    # a few steps on coloured squares already separate the six colours
    assert local["metrics"]["acc1"] >= 0.8


def test_cli_writes_results_table_run_json_and_pushes_metrics(micro_run, tmp_path, cli_env):
    eval_set = str(tmp_path / "sets" / "colours")
    write_classification_set(eval_set)
    port = free_port()
    gateway = subprocess.Popen([which("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        root = micro_run.rsplit("/", 1)[0]
        proc = subprocess.run(
            [which("clipforge"), "evaluate", "--root", root, "--run-id", "r1", "--eval-data", eval_set,
             "--workers", "0", "--pushgateway", f"http://127.0.0.1:{port}"],
            env=cli_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        pushed = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        gateway.terminate()
        gateway.wait(10)
    results = _results(f"{micro_run}/eval/results.json")
    acc1 = results["datasets"]["colours"]["metrics"]["acc1"]
    assert "colours  classification  24       acc1" in proc.stdout
    assert f"{acc1:.4f}" in proc.stdout
    run = _results(f"{micro_run}/run.json")["stages"]["evaluate"]
    assert run["inputs"]["checkpoint"].endswith("checkpoints/step_60.pt")
    assert run["outputs"]["results"] == f"{micro_run}/eval/results.json"
    line = next(ln for ln in pushed.splitlines()
                if ln.startswith("clipforge_evaluate_metric{") and 'metric="acc1"' in ln)
    assert 'dataset="colours"' in line and 'run_id="r1"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(acc1)
    assert any(ln.startswith("clipforge_evaluate_samples_total{") and ln.endswith(" 24")
               for ln in pushed.splitlines())


def test_val_split_of_a_download_manifest_is_evaluated_as_retrieval(micro_run, tmp_path):
    data = tmp_path / "data"
    shards = []
    for s in range(2):
        samples = [{"__key__": f"{s:05d}{i:04d}", "jpg": b, "txt": caption,
                    "json": json.dumps({"caption": caption}).encode()}
                   for i, (b, caption) in enumerate(write_retrieval_set(str(tmp_path / "tmp"), per_class=1))]
        (data / f"{s:05d}.tar").parent.mkdir(exist_ok=True)
        (data / f"{s:05d}.tar").write_bytes(tar_bytes(samples))
        shards.append(str(data / f"{s:05d}.tar"))
    manifest = {"format": "clipforge.manifest/1", "splits": {"val": {"shards": shards, "samples": 12}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--checkpoint", micro_run, "--val-data", str(data), "--root", str(tmp_path), "--run-id", "r",
                 "--workers", "0"]) == 0
    val = _results(str(tmp_path / "r" / "eval" / "results.json"))["datasets"]["val"]
    assert val["task"] == "zeroshot_retrieval" and val["samples"] == 12
    assert set(val["metrics"]) >= {"text_retrieval_recall@1", "image_retrieval_recall@10",
                                   "text_retrieval_median_rank", "image_retrieval_mean_rank"}


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(micro_run, tmp_path, cli_env):
    write_classification_set(str(tmp_path / "colours"), shards=3)
    write_retrieval_set(str(tmp_path / "captions"), shards=1)  # fewer shards than ranks: split by sample
    write_winogavil_cache(str(tmp_path / "suite" / "hf_cache"))  # examples split over the ranks
    common = ["--checkpoint", micro_run, "--eval-data", str(tmp_path / "colours"), str(tmp_path / "captions"),
              "--root", str(tmp_path), "--run-id", "r", "--workers", "1",
              "--suite", "datacomp", "--suite-root", str(tmp_path / "suite")]
    assert main([*common, "--output", str(tmp_path / "one.json")]) == 0
    proc = subprocess.run([which("torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "stages.evaluate", *common, "--output", str(tmp_path / "two.json")],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stderr
    one, two = _results(str(tmp_path / "one.json")), _results(str(tmp_path / "two.json"))
    for name in ("colours", "captions", "misc/winogavil"):
        assert two["datasets"][name]["samples"] == one["datasets"][name]["samples"]
        assert two["datasets"][name]["metrics"] == pytest.approx(one["datasets"][name]["metrics"], abs=1e-6)


def test_module_entry_point_has_help(cli_env):
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--help"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--checkpoint", "--eval-data", "--val-data", "--batch-size", "--workers", "--precision"):
        assert flag in proc.stdout
