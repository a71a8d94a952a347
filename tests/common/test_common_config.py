"""Config: defaults < YAML < flags, unknown keys rejected, --check-config runs nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from stages.common.cli import stage_main
from stages.common.config import CommonConfig, parse_config
from stages.common.errors import ConfigError


@dataclass
class ToyConfig(CommonConfig):
    batch_size: int = field(default=8, metadata={"help": "batch"})
    lr: float = 1e-3
    names: list[str] = field(default_factory=list)
    local_loss: bool = False

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} must be at least 1")


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch-size: 32\nlr: 0.5\nlocal_loss: true\nnames: [a, b]\nrun_id: r\n")
    cfg, check = parse_config(ToyConfig, ["--config", str(path), "--lr", "0.1"], prog="t")
    assert (cfg.batch_size, cfg.lr, cfg.local_loss, cfg.names, cfg.run_id) == (32, 0.1, True, ["a", "b"], "r")
    assert not check
    cfg, _ = parse_config(ToyConfig, ["--config", str(path), "--no-local-loss", "--names", "z"], prog="t")
    assert cfg.local_loss is False and cfg.names == ["z"]
    cfg, _ = parse_config(ToyConfig, [], prog="t")
    assert cfg.batch_size == 8 and cfg.run_id  # a fresh run id


@pytest.mark.parametrize("text,message", [
    ("batch_size: 2\nbogus: 1\n", "unknown option 'bogus'"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
    ("batch_size: 0\n", "--batch-size 0 must be at least 1"),
])
def test_bad_yaml(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(ToyConfig, ["--config", str(path)], prog="t")


def test_check_config_prints_and_does_not_run(capsys):
    ran = []
    assert stage_main("toy", ToyConfig, ran.append, ["--check-config", "--batch-size", "4",
                                                    "--run-id", "x"]) == 0
    assert ran == []
    printed = json.loads(capsys.readouterr().out)
    assert printed["batch_size"] == 4 and printed["run_id"] == "x"


def test_errors_print_one_line_with_exit_code(capsys):
    assert stage_main("toy", ToyConfig, lambda c: 0, ["--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "clipforge toy: error: --batch-size 0 must be at least 1"
    assert stage_main("toy", ToyConfig, lambda c: 0, ["--run-id", "a/b"]) == 2
    assert "must not contain '/'" in capsys.readouterr().err
