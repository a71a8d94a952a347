"""Every flag of open_clip_train 3.3.0's own parser: a row in docs/train.md, and the same behaviour.

The reference is open_clip_train's `parse_args` parser itself (captured from the installed
package), so a flag it adds or changes fails here until clipforge's parser and table follow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from stages.common.cli import stage_main
from stages.common.config import build_parser
from stages.common.errors import ConfigError
from stages.train import openclip_flags as flags
from stages.train.config import TrainConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "train.md"
# values that are valid for both parsers, where a generic sample would not be
SAMPLES = {"lr_scheduler": ["const"], "opt": ["timm/lamb"], "report_to": ["tensorboard"],
           "loss_dist_impl": ["shift"], "model": ["ViT-B-32"], "device": ["cpu"], "dist_backend": ["gloo"],
           "aug_cfg": ["scale=(0.9, 1.0)", "color_jitter=0.4", "use_timm=True"],
           "csv_separator": [","], "pretrained": ["laion2b_s34b_b79k"]}


@pytest.fixture(scope="module")
def theirs() -> argparse.ArgumentParser:
    return flags.open_clip_train_parser()


@pytest.fixture(scope="module")
def ours() -> argparse.ArgumentParser:
    return build_parser(TrainConfig, "clipforge train")


def their_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def samples(action: argparse.Action) -> list[list[str]]:
    """Argument lists exercising one flag: each choice, or a typed value (two for nargs='+')."""
    if action.nargs == 0:
        return [[]]
    if action.dest in SAMPLES:
        return [SAMPLES[action.dest]]
    if action.choices:
        return [[c] for c in action.choices]
    value = {int: "3", float: "0.25"}.get(action.type, "some-value")
    return [[value, value]] if action.nargs in ("+", "*") else [[value]]


def normal(value):
    return list(value) if isinstance(value, tuple | list) else value


def test_every_open_clip_train_flag_is_accepted_and_has_a_row_in_the_docs(theirs, ours):
    our_flags = {o for a in ours._actions for o in a.option_strings}
    rows = {row[0]: row for row in flags.table_rows()}
    missing = [o for a in their_actions(theirs) for o in a.option_strings if o not in our_flags]
    assert not missing, f"open_clip_train flags clipforge train does not accept: {missing}"
    no_row = [a.option_strings[0] for a in their_actions(theirs) if a.option_strings[0] not in rows]
    assert not no_row, f"open_clip_train flags without a row in the table: {no_row}"
    assert len(their_actions(theirs)) == 90  # open_clip_train 3.3.0 has 90 flags
    assert flags.markdown_table() in DOCS.read_text(), (
        "docs/train.md's flag table is stale: run python -m stages.train.openclip_flags")


def test_flags_that_are_the_same_parse_to_the_same_values(theirs, ours):
    checked = 0
    for action in their_actions(theirs):
        if action.dest in flags.REPLACED:
            continue
        for values in samples(action):
            argv = [action.option_strings[0], *values]
            expected = getattr(theirs.parse_args(argv), action.dest)
            got = getattr(ours.parse_args(argv), action.dest)
            if action.dest == "aug_cfg":
                got = flags.aug_cfg_dict(got)
            assert normal(got) == normal(expected), f"{' '.join(argv)}: clipforge {got!r}, open_clip_train {expected!r}"
            checked += 1
    assert checked > 70


def test_defaults_are_the_same_unless_the_table_says_why(theirs):
    cfg = TrainConfig()
    undocumented = {}
    for action in their_actions(theirs):
        if action.dest in flags.DEFAULTS_DIFFER or action.dest in ("beta1", "beta2", "eps"):
            continue
        if normal(getattr(cfg, action.dest)) != normal(action.default):
            undocumented[action.dest] = (getattr(cfg, action.dest), action.default)
    assert not undocumented, f"defaults that differ from open_clip_train without a reason in the table: {undocumented}"
    # open_clip_train resolves None betas/eps by model family; so does clipforge (None until the optimizer)
    assert (cfg.beta1, cfg.beta2, cfg.eps) == (None, None, None)


def test_translated_flags_set_clipforge_equivalents():
    cfg = TrainConfig(logs="s3://bucket/logs", name="exp1", delete_previous_checkpoint=True, debug=True,
                      save_most_recent=True)
    assert (cfg.root, cfg.run_id, cfg.keep_last, cfg.log_level) == ("s3://bucket/logs", "exp1", 1, "DEBUG")
    assert cfg.run_dir == "s3://bucket/logs/exp1"  # open_clip_train's {logs}/{name}
    assert cfg.checkpoint_dir == "s3://bucket/logs/exp1/checkpoints"
    with pytest.raises(ConfigError, match="--logs .* and --root .* disagree"):
        TrainConfig(logs="/a", root="/b")
    with pytest.raises(ConfigError, match="--keep-last 1"):
        TrainConfig(delete_previous_checkpoint=True, keep_last=3)


def _stage_error(capsys, *argv: str) -> str:
    ran = []
    code = stage_main("train", TrainConfig, ran.append,
                      ["--dataset-type", "synthetic", "--root", "/nonexistent/never-written", *argv])
    assert code == 2 and not ran, f"{argv}: exit {code}"
    return capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n, (kind, _) in flags.REPLACED.items()
                                  if kind in (flags.REFUSED, flags.EVALUATION)])
def test_refused_flags_stop_with_our_equivalent(capsys, theirs, name):
    action = next(a for a in their_actions(theirs) if a.dest == name)
    err = _stage_error(capsys, action.option_strings[0], *samples(action)[0])
    assert f"{action.option_strings[0]}: not supported by clipforge train; {flags.REPLACED[name][1]}" in err


@pytest.mark.parametrize("argv, message", [
    (["--siglip", "--local-loss"], "--local-loss applies to the CLIP loss"),
    (["--siglip", "--gather-with-grad"], "--gather-with-grad applies to the CLIP loss"),
    (["--loss-dist-impl", "gather"], "--loss-dist-impl is SigLIP's"),
    (["--model", "coca_ViT-B-32", "--siglip"], "CoCa trains with its own"),
    (["--coca-caption-loss-weight", "1"], "apply to CoCa models"),
    (["--distill-model", "ViT-B-32"], "needs both --distill-model and --distill-pretrained"),
    (["--distill-model", "clipforge-micro", "--distill-pretrained", "/w.pt", "--accum-freq", "2"],
     "--accum-freq > 1"),
    (["--lock-image-unlocked-groups", "2"], "need --lock-image"),
    (["--lock-text-freeze-layer-norm"], "need --lock-text"),
    (["--momentum", "0.9"], "--momentum applies to timm optimizers"),
    (["--opt", "sgd"], "unknown optimizer; use adamw or timm/NAME"),
    (["--opt", "timm/nosuch"], "timm has no optimizer 'nosuch'"),
    (["--opt", "timm/lamb", "--beta1", "0.9"], "give both --beta1 and --beta2"),
    (["--report-to", "comet"], "unknown ['comet']"),
    (["--aug-cfg", "scale"], "expected KEY=VALUE"),
    (["--force-image-size", "1", "2", "3"], "give one size or H W"),
    (["--model", "ViT-B-32", "--pretrained", "no_such_tag"], "not a released tag of ViT-B-32"),
    # with the model resolved (in set-up, and under --check-config)
    (["--check-config", "--pretrained-image"], "--pretrained-image: the image tower of clipforge-micro is not a timm"),
    (["--use-bnb-linear", "SwitchBackLinear"],
     "needs bitsandbytes<0.50 (its triton SwitchBack layers) and a CUDA GPU; the bitsandbytes package is not"),
])
def test_combinations_that_cannot_work_are_errors(capsys, argv, message):
    assert message in _stage_error(capsys, *argv)


def test_csv_without_the_caption_column_is_named(capsys, tmp_path):
    table = tmp_path / "train.csv"
    table.write_text("filepath\ttext\na.jpg\ta cat\n")
    # the table is read where the data is probed: in set-up and under --check-config
    err = _stage_error(capsys, "--check-config", "--dataset-type", "csv", "--train-data", str(table))
    assert "no column 'title'" in err and "--csv-caption-key" in err
