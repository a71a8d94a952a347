"""Any model in one table: a stock open_clip model by name and tag from an offline Hugging Face
cache, hf-hub: and local-dir: models, an open_clip_train checkpoint, and sets that rely on
built-in class names."""

from __future__ import annotations

import io
import json
import subprocess

import open_clip
import pytest
import torch
from evalkit import CLASSNAMES, TEMPLATES, save_checkpoint, untrained_micro, write_classification_set
from PIL import Image

from stages.common import storage
from stages.common.errors import ConfigError, DataError
from stages.evaluate import stock
from stages.evaluate.cli import main
from tests.conftest import which

STOCK, TAG = "ViT-B-32", "laion2b_s34b_b79k"


def _prepare_hf_cache(cache, state: dict) -> None:
    """The layout huggingface_hub leaves after downloading the tag's weights: refs/main names a
    snapshot holding open_clip_model.safetensors."""
    from safetensors.torch import save_file

    repo = open_clip.get_pretrained_cfg(STOCK, TAG)["hf_hub"].strip("/")
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "open_clip_model.safetensors"))


def _zero_shot_acc1(model, preprocess, items) -> float:
    tokenizer = open_clip.get_tokenizer(STOCK)
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, CLASSNAMES, [lambda c, t=t: t.replace("{c}", c) for t in TEMPLATES])
    images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in items])
    with torch.no_grad():
        logits = model.encode_image(images, normalize=True) @ classifier
    return (logits.argmax(1) == torch.tensor([label for _, label in items])).float().mean().item()


@pytest.mark.slow
def test_stock_model_by_name_and_tag_from_an_offline_hf_cache(tmp_path, cli_env):
    torch.manual_seed(11)
    model, _, preprocess = open_clip.create_model_and_transforms(STOCK)
    model.eval()
    _prepare_hf_cache(tmp_path / "hf", model.state_dict())
    items = write_classification_set(str(tmp_path / "colours"), per_class=2, shards=1)
    env = {**cli_env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HOME": str(tmp_path / "home")}
    out = tmp_path / "stock.json"
    proc = subprocess.run([which("clipforge"), "evaluate", "--model", STOCK, "--pretrained", TAG,
                           "--eval-data", str(tmp_path / "colours"), "--root", str(tmp_path), "--run-id", "base",
                           "--workers", "0", "--batch-size", "6", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    colours = doc["datasets"]["colours"]
    assert doc["model"]["name"] == f"{STOCK}:{TAG}" and colours["samples"] == len(items)
    # the weights are the cached ones, not a fresh initialisation
    assert colours["metrics"]["acc1"] == pytest.approx(_zero_shot_acc1(model, preprocess, items), abs=1e-6)

    empty = {**env, "HF_HUB_CACHE": str(tmp_path / "empty")}
    proc = subprocess.run([which("clipforge"), "evaluate", "--model", STOCK, "--pretrained", TAG,
                           "--eval-data", str(tmp_path / "colours"), "--root", str(tmp_path), "--run-id", "base"],
                          env=empty, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "cannot load the weights" in proc.stderr


def test_unknown_tag_or_model_fails_before_loading(tmp_path, capsys):
    write_classification_set(str(tmp_path / "colours"), per_class=1, shards=1)
    base = ["--eval-data", str(tmp_path / "colours"), "--root", str(tmp_path), "--run-id", "x"]
    for flags, message in ((["--model", "ViT-B-32", "--pretrained", "nosuchtag"], "'nosuchtag' is not a tag of ViT-B-32"),
                           (["--model", "ViT-Nope"], "'ViT-Nope' is not a known open_clip model"),
                           (["--pretrained", TAG], "needs --model NAME")):
        assert main([*flags, *base]) == ConfigError.exit_code
        assert message in capsys.readouterr().err


def test_open_clip_train_checkpoint_with_model_name(tmp_path):
    """open_clip_train's epoch_N.pt ({'epoch', 'name', 'state_dict' with DDP's module. prefix})."""
    model = untrained_micro(seed=5)
    ours_run = str(tmp_path / "run")
    save_checkpoint(model, ours_run, step=1)
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "my-run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               ckpt)
    write_classification_set(str(tmp_path / "colours"), per_class=3, shards=1)
    rows = {}
    for label, flags in (("oct", ["--model", "clipforge-micro", "--pretrained", str(ckpt)]),
                         ("clipforge", ["--checkpoint", ours_run])):
        out = tmp_path / f"{label}.json"
        assert main([*flags, "--eval-data", str(tmp_path / "colours"), "--root", str(tmp_path), "--run-id", "r",
                     "--workers", "0", "--output", str(out)]) == 0
        rows[label] = json.loads(out.read_text())["datasets"]["colours"]["metrics"]
    assert rows["oct"] == pytest.approx(rows["clipforge"], abs=1e-6)


def test_imagenet_named_set_without_classnames_uses_builtin_names(tmp_path, micro_run, capsys):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    uri = str(tmp_path / "imagenet-val")
    write_classification_set(uri, per_class=2, shards=1)
    storage.delete(storage.join(uri, "classnames.txt"))
    storage.delete(storage.join(uri, "zeroshot_classification_templates.txt"))
    out = tmp_path / "in.json"
    assert main(["--checkpoint", micro_run, "--eval-data", uri, "--root", str(tmp_path), "--run-id", "r",
                 "--workers", "0", "--output", str(out)]) == 0
    res = json.loads(out.read_text())["datasets"]["imagenet-val"]
    assert res["samples"] == 12 and "acc5" in res["metrics"]
    assert "IMAGENET_CLASSNAMES" in res["builtin_metadata"]["classnames"]
    assert "OPENAI_IMAGENET_TEMPLATES" in res["builtin_metadata"]["templates"]
    assert len(IMAGENET_CLASSNAMES) == 1000

    unknown = str(tmp_path / "mystery")
    write_classification_set(unknown, per_class=1, shards=1)
    storage.delete(storage.join(unknown, "classnames.txt"))
    assert main(["--checkpoint", micro_run, "--eval-data", unknown, "--root", str(tmp_path),
                 "--run-id", "r"]) == DataError.exit_code
    assert "mystery/classnames.txt: missing, and 'mystery'" in capsys.readouterr().err


def test_clip_benchmark_names_for_a_known_dataset(tmp_path, micro_run):
    from importlib import resources

    from stages.common.classmeta import builtin_classnames

    shipped = json.loads(resources.files("clip_benchmark.datasets").joinpath("en_classnames.json").read_text())

    uri = str(tmp_path / "wds_vtab-eurosat_test")
    write_classification_set(uri, per_class=1, shards=1)
    storage.delete(storage.join(uri, "classnames.txt"))
    out = tmp_path / "eurosat.json"
    assert main(["--checkpoint", micro_run, "--eval-data", uri, "--root", str(tmp_path), "--run-id", "r",
                 "--workers", "0", "--output", str(out)]) == 0
    res = json.loads(out.read_text())["datasets"]["wds_vtab-eurosat_test"]
    assert "en_classnames.json" in res["builtin_metadata"]["classnames"]
    assert "templates" not in res["builtin_metadata"]  # the folder's own templates win
    assert builtin_classnames("wds_vtab-eurosat_test") == shipped["eurosat"] and len(shipped["eurosat"]) == 10


def _hub_folder(model, folder) -> None:
    """The files of open_clip's Hub layout, as `clipforge export` writes them."""
    from stages.export.weights import write_layout

    folder.mkdir(parents=True)
    write_layout(str(folder), model, open_clip.get_model_config("clipforge-micro"),
                 {"model_name": "clipforge-micro", "step": 1, "uri": "test"}, "fp32")


def test_local_dir_and_hf_hub_models_equal_the_checkpoint_of_the_same_weights(tmp_path, cli_env):
    model = untrained_micro(seed=6)
    save_checkpoint(model, str(tmp_path / "run"), step=1)
    write_classification_set(str(tmp_path / "colours"), per_class=3, shards=1)
    _hub_folder(model, tmp_path / "folder")
    repo = "clipforge-test/micro"  # only ever in the local cache: HF_HUB_OFFLINE=1 below
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    hub = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(commit)
    _hub_folder(model, hub / "snapshots" / commit)

    base = ["--eval-data", str(tmp_path / "colours"), "--root", str(tmp_path), "--run-id", "r", "--workers", "0"]
    for label, flags in (("checkpoint", ["--checkpoint", str(tmp_path / "run")]),
                         ("local-dir", ["--model", f"local-dir:{tmp_path / 'folder'}"])):
        assert main([*flags, *base, "--output", str(tmp_path / f"{label}.json")]) == 0
    env = {**cli_env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([which("clipforge"), "evaluate", "--model", f"hf-hub:{repo}", *base,
                           "--output", str(tmp_path / "hf-hub.json")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = {label: json.loads((tmp_path / f"{label}.json").read_text())
            for label in ("checkpoint", "local-dir", "hf-hub")}
    assert docs["hf-hub"]["model"]["name"] == f"hf-hub:{repo}"
    assert docs["local-dir"]["model"]["name"] == f"local-dir:{tmp_path / 'folder'}"
    reference = docs["checkpoint"]["datasets"]["colours"]["metrics"]
    assert 0 < reference["acc1"] < 1
    for label in ("local-dir", "hf-hub"):
        assert docs[label]["datasets"]["colours"]["metrics"] == pytest.approx(reference, abs=1e-6), label

    with pytest.raises(ConfigError, match="leave --pretrained out"):
        stock.check(f"hf-hub:{repo}", TAG)
    empty = {**env, "HF_HUB_CACHE": str(tmp_path / "empty")}
    proc = subprocess.run([which("clipforge"), "evaluate", "--model", f"hf-hub:{repo}", *base], env=empty,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"hf-hub:{repo}" in proc.stderr and "cannot load the weights" in proc.stderr
