"""Released weights offline: `--pretrained hf-hub:ORG/REPO`, a released tag and `--pretrained-image`,
from a prepared Hugging Face cache read by the real huggingface_hub with HF_HUB_OFFLINE=1 (no hub is
reachable).

The cache is laid out as huggingface_hub writes it: `models--ORG--REPO/snapshots/<commit>/FILE`
with `refs/main` naming the commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from trainrun import load_checkpoint, run, stage_cmd, train_env

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SYNTHETIC = ["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "8"]


def put_in_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def micro_export(tmp: Path, seed: int) -> dict[str, bytes]:
    """An open_clip Hub layout of a clipforge-micro model with seeded random weights."""
    import open_clip

    from stages.common.models import model_config, register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model("clipforge-micro")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "w.safetensors")
    config = {"model_cfg": model_config("clipforge-micro"), "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    return {"open_clip_config.json": json.dumps(config).encode(),
            "open_clip_model.safetensors": (tmp / "w.safetensors").read_bytes()}


def offline_env(cli_env: dict, **extra: str) -> dict:
    return train_env(cli_env, HF_HUB_OFFLINE="1", **extra)


def test_hf_hub_repo_from_the_cache_offline(tmp_path, cli_env):
    hub = tmp_path / "hub"
    files = micro_export(tmp_path, seed=7)
    snapshot = put_in_hf_cache(hub, "clipforge-test/micro", files)
    # --lr 0: the one step changes nothing, so the checkpoint holds exactly the weights loaded
    rc, out = run(stage_cmd(*SYNTHETIC, "--pretrained", "hf-hub:clipforge-test/micro", "--model", "",
                            "--lr", "0", "--steps", "1", "--root", str(tmp_path / "runs"), "--run-id", "hub"),
                  offline_env(cli_env, HF_HUB_CACHE=str(hub)), tmp_path / "hub.log", timeout=600)
    assert rc == 0, out
    ckpt = load_checkpoint(str(tmp_path / "runs/hub/checkpoints/step_1.pt"))
    expected = load_file(snapshot / "open_clip_model.safetensors")
    assert ckpt["model"].keys() == expected.keys()
    assert all(torch.equal(ckpt["model"][k], expected[k]) for k in expected)
    assert ckpt["model_name"] == "clipforge-test--micro" and ckpt["model_cfg"]["embed_dim"] > 0


def test_hf_hub_weights_into_a_named_model_with_cache_dir(tmp_path, cli_env):
    hub = tmp_path / "cache"
    snapshot = put_in_hf_cache(hub, "clipforge-test/micro", micro_export(tmp_path, seed=3))
    rc, out = run(stage_cmd(*SYNTHETIC, "--model", "clipforge-micro", "--pretrained", "hf-hub:clipforge-test/micro",
                            "--cache-dir", str(hub), "--lr", "0", "--steps", "1", "--lock-image",
                            "--root", str(tmp_path / "runs"), "--run-id", "named"),
                  offline_env(cli_env), tmp_path / "named.log", timeout=600)
    assert rc == 0, out
    ckpt = load_checkpoint(str(tmp_path / "runs/named/checkpoints/step_1.pt"))
    expected = load_file(snapshot / "open_clip_model.safetensors")
    assert all(torch.equal(ckpt["model"][k], expected[k]) for k in expected)


def test_missing_from_the_offline_cache_fails_clearly(tmp_path, cli_env):
    rc, out = run(stage_cmd(*SYNTHETIC, "--pretrained", "hf-hub:clipforge-test/absent", "--model", "",
                            "--steps", "1", "--cache-dir", str(tmp_path / "empty"), "--root", str(tmp_path / "runs")),
                  offline_env(cli_env), tmp_path / "absent.log", timeout=600)
    assert rc != 0
    assert "hf-hub:clipforge-test/absent" in out and "HF_HUB_OFFLINE" in out
    assert "Traceback" not in out


TAG_CHECK = """
import sys, torch
from safetensors.torch import load_file
from stages.train.config import TrainConfig
from stages.train.model import build_model
cfg = TrainConfig(model="RN50", pretrained="openai", cache_dir=sys.argv[1], train_data="unused")
bundle = build_model(cfg, torch.device("cpu"), 0)
expected = load_file(sys.argv[2])
state = bundle.model.state_dict()
assert all(torch.equal(state[k], expected[k].float()) for k in expected), "weights differ"
print("LOADED", len(expected), bundle.preprocess_cfg["mean"])
"""


@pytest.mark.slow
def test_released_tag_resolves_from_the_cache_offline(tmp_path, cli_env):
    """RN50's `openai` tag: open_clip maps it to the Hub repo timm/resnet50_clip.openai."""
    import open_clip

    hub = tmp_path / "hub"
    torch.manual_seed(1)
    weights = {k: v.half().contiguous() for k, v in open_clip.create_model("RN50").state_dict().items()}
    save_file(weights, tmp_path / "rn50.safetensors")
    snapshot = put_in_hf_cache(hub, "timm/resnet50_clip.openai",
                               {"open_clip_model.safetensors": (tmp_path / "rn50.safetensors").read_bytes()})
    (tmp_path / "rn50.safetensors").unlink()
    proc = subprocess.run([sys.executable, "-c", TAG_CHECK, str(hub), str(snapshot / "open_clip_model.safetensors")],
                          env=offline_env(cli_env), capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the openai tag's own preprocessing comes with it (OpenAI's mean, not open_clip's default)
    assert "LOADED" in proc.stdout and "0.48145466" in proc.stdout


# A CLIP model whose image tower is timm's test_convnext: timm's own ImageNet weights for it live in
# the Hub repo timm/test_convnext.r160_in1k, which is what --pretrained-image makes timm fetch.
TIMM_MICRO = {"embed_dim": 32,
              "vision_cfg": {"timm_model_name": "test_convnext", "timm_pool": "avg", "timm_proj": "linear",
                             "image_size": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def timm_release(tmp: Path, seed: int) -> dict[str, bytes]:
    """test_convnext's weights and config.json as timm publishes them (timm's own save_for_hf)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    save_for_hf(timm.create_model("test_convnext.r160_in1k"), str(tmp / "release"), safe_serialization=True)
    return {name: (tmp / "release" / name).read_bytes() for name in ("model.safetensors", "config.json")}


def test_pretrained_image_loads_the_timm_tower_from_the_cache_offline(tmp_path, cli_env):
    import open_clip

    from stages.train.model import random_seed

    hub = tmp_path / "hub"
    snapshot = put_in_hf_cache(hub, "timm/test_convnext.r160_in1k", timm_release(tmp_path, seed=11))
    config = tmp_path / "timm-micro.json"
    config.write_text(json.dumps(TIMM_MICRO))
    rc, out = run(stage_cmd(*SYNTHETIC, "--model", "timm-micro", "--model-config", str(config), "--pretrained-image",
                            "--lr", "0", "--steps", "1", "--root", str(tmp_path / "runs"), "--run-id", "img"),
                  offline_env(cli_env, HF_HUB_CACHE=str(hub)), tmp_path / "img.log", timeout=600)
    assert rc == 0, out
    state = load_checkpoint(str(tmp_path / "runs/img/checkpoints/step_1.pt"))["model"]
    released = load_file(snapshot / "model.safetensors")
    trunk = {k.removeprefix("visual.trunk."): v for k, v in state.items() if k.startswith("visual.trunk.")}
    # every backbone tensor is timm's; only its ImageNet classifier is dropped for CLIP's projection
    assert set(released) - set(trunk) == {"head.fc.weight", "head.fc.bias"} and set(trunk) <= set(released)
    assert all(torch.equal(trunk[k], released[k]) for k in trunk)
    # the text tower (and the projection) start as without the flag: the stage's seeded random init
    open_clip.add_model_config(str(config))
    random_seed(0)
    fresh = open_clip.create_model("timm-micro").state_dict()
    assert not torch.equal(fresh["visual.trunk.stem.0.weight"], released["stem.0.weight"])
    rest = [k for k in state if not k.startswith("visual.trunk.")]
    assert "text_projection" in rest and all(torch.equal(state[k], fresh[k]) for k in rest)

