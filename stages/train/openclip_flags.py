"""How `clipforge train` treats each of open_clip_train 3.3.0's flags, and the table docs/train.md shows.

Most flags are the same flag with the same meaning. Where clipforge's design replaces a concept
(the log folder and experiment name, remote sync, horovod, copying the code base) the flag is
translated into ours or refused with a message naming ours. `python -m stages.train.openclip_flags` rewrites the table in docs/train.md
from the train stage's parser; a test compares it, and every flag, with open_clip_train's parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

from stages.common.errors import ConfigError

SAME, TRANSLATED, REFUSED, EVALUATION, OURS = "same", "translated", "refused", "see evaluation", "clipforge"

# field -> (kind, what clipforge does instead); every other open_clip_train flag is SAME
REPLACED: dict[str, tuple[str, str]] = {
    "logs": (TRANSLATED, "sets `--root`: the run lives at `{logs}/{name}/`, checkpoints in `checkpoints/`"),
    "name": (TRANSLATED, "sets `--run-id`"),
    "save_frequency": (TRANSLATED, "also checkpoints at the end of every N-th epoch; step checkpoints "
                                   "come from `--save-every-steps`"),
    "save_most_recent": (TRANSLATED, "always on: `checkpoints/LATEST` names the newest checkpoint"),
    "delete_previous_checkpoint": (TRANSLATED, "sets `--keep-last 1`"),
    "debug": (TRANSLATED, "sets `--log-level DEBUG`"),
    "remote_sync": (REFUSED, "clipforge writes checkpoints and TensorBoard events straight to the store: "
                             "use --root s3://bucket/prefix (any fsspec URI)"),
    "remote_sync_frequency": (REFUSED, "no sync process to time: use --root s3://bucket/prefix"),
    "remote_sync_protocol": (REFUSED, "every fsspec store works directly: use --root s3://bucket/prefix"),
    "horovod": (REFUSED, "clipforge runs its ranks with torchrun (a PyTorchJob on Kubernetes): "
                         "torchrun --nproc-per-node N -m stages.train ..."),
    "copy_codebase": (REFUSED, "the container image is the code; run.json records the package versions"),
    "torchscript": (REFUSED, "use --torchcompile; the evaluate and export stages load plain open_clip models"),
    "trace": (REFUSED, "a traced model cannot be trained (open_clip_train refuses it too); "
                       "inference is the evaluate stage's"),
}

# open_clip_train flags whose default differs here, and why (the meaning of a given value is the same)
DEFAULTS_DIFFER: dict[str, str] = {
    "model": "a tiny CPU-friendly model (open_clip_train: RN50)",
    "epochs": "1 (open_clip_train: 32); `--steps` counts optimizer steps instead",
    "workers": "2 (open_clip_train: 4)",
    "precision": "fp32, which runs everywhere (open_clip_train: amp)",
    "device": "auto: cuda when visible, else cpu (open_clip_train: cuda)",
    "val_data": "auto: the manifest's val split (open_clip_train: none)",
    "logs": "--root ./runs (open_clip_train: ./logs/)",
    "lr": "5e-4, what open_clip_train resolves its None to",
    "pretrained": "none, as open_clip_train's ''",
    "save_frequency": "step checkpoints every --save-every-steps (open_clip_train: every epoch)",
    "val_num_samples": "10000: a cap on the validation samples (open_clip_train: the val set's size "
                       "when the shards do not say)",
    "val_frequency": "0: validate at the end of the run (open_clip_train: every epoch)",
    "aug_cfg": "[] (open_clip_train: {}); both mean open_clip's defaults",
    "remote_sync_frequency": "refused flag", "remote_sync_protocol": "refused flag",
    "train_data": "'' (required unless --dataset-type synthetic)",
    "cache_dir": "'': Hugging Face's cache", "dist_url": "'': env://", "dist_backend": "'': by device",
    "use_bnb_linear": "'': none", "distill_model": "'': none", "distill_pretrained": "'': none",
    "resume": "'': none", "imagenet_val": "'': none", "imagenet_v2": "'': none", "train_data_upsampling_factors": "'': none",
}

_REFUSED_KINDS = (REFUSED, EVALUATION)


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _field_defaults(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def translate(cfg: Any) -> None:
    """Map open_clip_train's flags for replaced concepts onto ours (runs when the config is built)."""
    defaults = _field_defaults(cfg)
    for theirs, ours in (("logs", "root"), ("name", "run_id")):
        value = getattr(cfg, theirs)
        if value is None:
            continue
        current = getattr(cfg, ours)
        if current != defaults[ours] and current != value:
            raise ConfigError(f"{flag(theirs)} {value} and {flag(ours)} {current} disagree: "
                              f"{flag(theirs)} is open_clip_train's name for {flag(ours)}; give one")
        setattr(cfg, ours, value)
    if cfg.delete_previous_checkpoint:
        if cfg.keep_last not in (defaults["keep_last"], 1):
            raise ConfigError(f"--delete-previous-checkpoint means --keep-last 1, but --keep-last is {cfg.keep_last}")
        cfg.keep_last = 1
    if cfg.debug:
        cfg.log_level = "DEBUG"


def check_refused(cfg: Any) -> None:
    defaults = _field_defaults(cfg)
    for name, (kind, instead) in REPLACED.items():
        if kind in _REFUSED_KINDS and getattr(cfg, name) != defaults[name]:
            raise ConfigError(f"{flag(name)}: not supported by clipforge train; {instead}")


def check_combinations(cfg: Any) -> None:
    """Flag combinations open_clip_train would ignore or crash on are errors here, named up front."""
    check_refused(cfg)
    coca = "coca" in cfg.model.lower()
    distill = bool(cfg.distill_model or cfg.distill_pretrained)
    rules = [
        (cfg.siglip and cfg.local_loss, "--local-loss applies to the CLIP loss; SigLIP's exchange is "
                                        "chosen with --loss-dist-impl"),
        (cfg.loss_dist_impl is not None and not cfg.siglip, "--loss-dist-impl is SigLIP's; add --siglip"),
        (cfg.siglip and coca, "--siglip with a CoCa model: CoCa trains with its own caption + CLIP loss"),
        (not coca and (cfg.coca_caption_loss_weight, cfg.coca_contrastive_loss_weight) != (2.0, 1.0),
         f"--coca-*-loss-weight apply to CoCa models (coca_*), not {cfg.model or 'the default model'}"),
        (distill and not (cfg.distill_model and cfg.distill_pretrained),
         "distillation needs both --distill-model and --distill-pretrained"),
        (distill and cfg.accum_freq > 1, "distillation does not combine with --accum-freq > 1 "
                                         "(nor does it in open_clip_train)"),
        (distill and (coca or cfg.siglip), "distillation uses the CLIP distillation loss: not with CoCa or --siglip"),
        (not cfg.lock_image and (cfg.lock_image_unlocked_groups or cfg.lock_image_freeze_bn_stats),
         "--lock-image-unlocked-groups/--lock-image-freeze-bn-stats need --lock-image"),
        (not cfg.lock_text and (cfg.lock_text_unlocked_layers or cfg.lock_text_freeze_layer_norm),
         "--lock-text-unlocked-layers/--lock-text-freeze-layer-norm need --lock-text"),
        (cfg.dataset_type != "synthetic" and not cfg.train_data,
         "--train-data is required: a run folder, data/ folder, manifest.json, brace pattern of "
         "webdataset shards, or a CSV table with --dataset-type csv"),
        (cfg.force_image_size is not None and len(cfg.force_image_size) not in (1, 2),
         f"--force-image-size {cfg.force_image_size}: give one size or H W"),
    ]
    for bad, message in rules:
        if bad:
            raise ConfigError(message)
    _check_optimizer(cfg)
    _check_reporting(cfg)
    aug_cfg_dict(cfg.aug_cfg)
    if cfg.use_bnb_linear:
        bnb_linear_class(cfg.use_bnb_linear)


# bitsandbytes dropped its triton SwitchBack layers after 0.49; they run on CUDA GPUs only
BNB_NEEDS = "bitsandbytes<0.50 (its triton SwitchBack layers) and a CUDA GPU"


def bnb_linear_class(name: str) -> type:
    """open_clip_train's `--use-bnb-linear NAME`: a class of bitsandbytes.nn.triton_based_modules."""
    flag = f"--use-bnb-linear {name}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{flag}: needs {BNB_NEEDS}; the bitsandbytes package is not installed "
                          "(the train image does not ship it)")
    import bitsandbytes

    try:
        module = importlib.import_module("bitsandbytes.nn.triton_based_modules")
    except ImportError as exc:
        raise ConfigError(f"{flag}: needs {BNB_NEEDS}; bitsandbytes {bitsandbytes.__version__} has no "
                          f"triton_based_modules ({exc})") from exc
    layers = sorted(n for n in dir(module) if n.endswith("Linear") and isinstance(getattr(module, n), type))
    if name not in layers:
        raise ConfigError(f"{flag}: not a layer of bitsandbytes.nn.triton_based_modules (its layers: {layers})")
    return getattr(module, name)


def check_bnb_device(name: str, device_type: str) -> None:
    if name and device_type != "cuda":
        raise ConfigError(f"--use-bnb-linear {name}: bitsandbytes' SwitchBack layers run triton kernels on "
                          f"CUDA GPUs only, and this run is on {device_type}; leave the flag out")


def _check_optimizer(cfg: Any) -> None:
    opt = cfg.opt.lower()
    if opt == "adamw":
        if cfg.momentum is not None:
            raise ConfigError("--momentum applies to timm optimizers (--opt timm/NAME), not adamw")
        return
    if not opt.startswith("timm/"):
        raise ConfigError(f"--opt {cfg.opt}: unknown optimizer; use adamw or timm/NAME (e.g. timm/lamb)")
    from timm.optim import list_optimizers

    name = opt.split("timm/", 1)[1]
    if name not in list_optimizers():
        raise ConfigError(f"--opt {cfg.opt}: timm has no optimizer {name!r}; see timm.optim.list_optimizers()")
    if (cfg.beta1 is None) != (cfg.beta2 is None):
        raise ConfigError("--opt timm/...: give both --beta1 and --beta2, or neither (as open_clip_train)")


REPORT_TO = ("tensorboard", "wandb", "all")


def report_targets(report_to: str) -> set[str]:
    names = {p.strip() for p in report_to.split(",") if p.strip()}
    if "all" in names:
        names = (names - {"all"}) | {"tensorboard", "wandb"}
    return names


def _check_reporting(cfg: Any) -> None:
    unknown = {p.strip() for p in cfg.report_to.split(",") if p.strip()} - set(REPORT_TO)
    if unknown:
        raise ConfigError(f"--report-to {cfg.report_to}: unknown {sorted(unknown)}; use tensorboard, wandb or both")
    for target in report_targets(cfg.report_to):
        if importlib.util.find_spec(target) is None:
            raise ConfigError(f"--report-to {target}: the {target} package is not installed (pip install {target})")


def aug_cfg_dict(pairs: Any) -> dict[str, Any]:
    """open_clip_train's `--aug-cfg KEY=VALUE ...` (values read as Python literals, else strings)."""
    import ast

    if isinstance(pairs, dict):  # from YAML
        return dict(pairs)
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise ConfigError(f"--aug-cfg {pair!r}: expected KEY=VALUE (e.g. scale='(0.9, 1.0)')")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


# ---------------------------------------------------------------- the docs table

def _ours_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}


def table_rows() -> list[tuple[str, str, str]]:
    """(flag, open_clip_train relation, what clipforge does) for every flag of the train parser."""
    from stages.common.config import build_parser
    from stages.train.config import TrainConfig

    parser = build_parser(TrainConfig, "clipforge train")
    known = open_clip_train_dests()
    rows = []
    for action in parser._actions:
        if action.dest == "help" or flag(action.dest) not in action.option_strings:
            continue  # --help, --config, --check-config
        kind, what = REPLACED.get(action.dest, (SAME if action.dest in known else OURS, ""))
        what = what or (action.help or "").replace("|", "\\|")
        if kind == SAME and action.dest in DEFAULTS_DIFFER:
            what += f"; default here: {DEFAULTS_DIFFER[action.dest]}"
        rows.append((flag(action.dest), kind, what))
    return rows


def open_clip_train_dests() -> set[str]:
    """The dest of every flag open_clip_train 3.3.0's parse_args defines."""
    return {a.dest for a in open_clip_train_parser()._actions if a.option_strings and a.dest != "help"}


def open_clip_train_parser() -> argparse.ArgumentParser:
    """open_clip_train's own parser, captured from its parse_args."""
    from open_clip_train import params

    captured: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured.append(self)
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        params.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured[0]


BEGIN, END = "<!-- flags:begin (python -m stages.train.openclip_flags) -->", "<!-- flags:end -->"


def markdown_table() -> str:
    lines = ["| Flag | open_clip_train | What clipforge does |", "|---|---|---|"]
    lines += [f"| `{f}` | {kind} | {what} |" for f, kind, what in table_rows()]
    return "\n".join(lines)


def write_docs(path: Path) -> None:
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}")


if __name__ == "__main__":
    write_docs(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[2] / "docs" / "train.md"))
