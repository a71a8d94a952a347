"""Export: the folder stock open_clip loads, on any store, with a model card; Hub push up to the call."""

from __future__ import annotations

import json
import os
import subprocess

import open_clip
import pytest
import torch
import yaml
from exportkit import TRAIN_CONFIG, embeddings, micro_model, save_run
from safetensors import safe_open

from stages.common import storage
from stages.export.cli import main
from tests.conftest import free_port, which


@pytest.fixture(scope="module")
def model():
    return micro_model()


@pytest.fixture
def run_dir(model, tmp_path):
    path = str(tmp_path / "runs" / "r1")
    save_run(model, path)
    return path


def _args(run_dir: str, *extra: str) -> list[str]:
    return ["--root", os.path.dirname(run_dir), "--run-id", os.path.basename(run_dir), *extra]


def test_round_trip_through_stock_open_clip(model, run_dir):
    assert main(_args(run_dir)) == 0
    export = f"{run_dir}/export"
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    _, _, ref_preprocess = open_clip.create_model_and_transforms("clipforge-micro")
    ref_tokenizer = open_clip.get_tokenizer("clipforge-micro")
    got = embeddings(loaded.eval(), preprocess, tokenizer)
    want = embeddings(model, ref_preprocess, ref_tokenizer)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    config = json.loads(open(f"{export}/open_clip_config.json").read())
    assert config["model_cfg"] == open_clip.get_model_config("clipforge-micro")
    assert config["preprocess_cfg"]["size"] == [32, 32]
    run = storage.read_json(f"{run_dir}/run.json")["stages"]["export"]
    assert run["inputs"]["checkpoint"] == f"{run_dir}/checkpoints/step_40.pt"
    assert sorted(os.listdir(export)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]


def test_model_card(run_dir):
    assert main(_args(run_dir, "--license", "mit", "--datasets", "me/colours", "--tags", "tiny")) == 0
    text = open(f"{run_dir}/export/README.md").read()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "open_clip" and meta["license"] == "mit"
    assert meta["datasets"] == ["me/colours"] and {"open_clip", "clip", "tiny"} <= set(meta["tags"])
    assert "| demo | classification | 60 | acc1 | 0.8750 |" in body
    assert "s3://bucket/urls.parquet" in body and "split `val`: 100 samples in 1 shards" in body
    assert f"lr: {TRAIN_CONFIG['lr']}" in body and '"embed_dim": 32' in body
    assert "open_clip.create_model_and_transforms('local-dir:" in body


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype(model, run_dir, dtype, torch_dtype):
    assert main(_args(run_dir, "--dtype", dtype)) == 0
    with safe_open(f"{run_dir}/export/open_clip_model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch_dtype}
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir}/export")
    got = embeddings(loaded.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{run_dir}/export"))
    want = embeddings(model, preprocess, open_clip.get_tokenizer("clipforge-micro"))
    assert torch.allclose(got[1], want[1], atol=0.05)


def test_export_to_s3_and_evaluate_from_there(run_dir, s3, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "evaluate"))
    from evalkit import write_classification_set

    from stages.evaluate.cli import main as evaluate

    out = f"{s3}/models/micro"
    assert main(_args(run_dir, "--output", out)) == 0
    assert sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(out)) == [
        "README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    write_classification_set(str(tmp_path / "colours"), per_class=2, shards=1)
    results = {}
    for name, ckpt in (("checkpoint", run_dir), ("export", out)):
        assert evaluate(["--checkpoint", ckpt, "--eval-data", str(tmp_path / "colours"), "--workers", "0",
                         "--root", str(tmp_path), "--run-id", "e", "--output", str(tmp_path / f"{name}.json")]) == 0
        results[name] = storage.read_json(str(tmp_path / f"{name}.json"))["datasets"]["colours"]
    assert results["export"]["metrics"] == pytest.approx(results["checkpoint"]["metrics"], abs=1e-6)
    assert results["export"]["checkpoint_step"] == 40


def test_dry_run_lists_the_upload_without_a_token(run_dir, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(_args(run_dir, "--push-to-hub", "me/micro", "--dry-run", "--private")) == 0
    out = capsys.readouterr().out
    assert "would push to https://huggingface.co/me/micro (private if created)" in out
    for name in ("README.md", "open_clip_config.json", "open_clip_model.safetensors"):
        assert f"  {name}  " in out
    assert "HF_TOKEN is NOT set" in out


def test_push_without_token_fails_before_any_work(run_dir, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(_args(run_dir, "--push-to-hub", "me/micro")) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    assert not os.path.exists(f"{run_dir}/export")


def test_unreachable_hub_is_a_clear_error(run_dir, cli_env):
    cli_env.update(HF_TOKEN="hf_test_not_a_real_token", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                   HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run([which("clipforge"), "export", *_args(run_dir, "--push-to-hub", "me/micro")],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4
    assert "pushing to Hub repo me/micro at http://internal-host failed" in proc.stderr  # redacted in logs
    assert os.path.exists(f"{run_dir}/export/open_clip_model.safetensors")  # the export itself is kept


def test_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "step_1.pt"
    torch.save({"weights": 1}, bad)
    assert main(["--checkpoint", str(bad), "--root", str(tmp_path), "--run-id", "r"]) == 3
    assert str(bad) in capsys.readouterr().err
