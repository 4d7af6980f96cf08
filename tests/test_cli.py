"""The CLI frame: subcommands listed, overrides anywhere, clear errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitpipe.cli import main

SUBCOMMANDS = ["model-info", "config", "shard", "train", "evaluate", "register", "rollback",
               "predict", "score", "export-onnx", "run", "stack"]


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "vitpipe.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in SUBCOMMANDS:
        assert name in out


def test_overrides_after_options_are_applied(capsys):
    assert main(["config", "show", "--stage", "train", "--config", "configs/fmnist_cpu.yaml",
                 "model.depth=2", "--section", "finetune", "train.epochs=3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["depth"] == 2
    assert cfg["train"]["epochs"] == 3
    assert cfg["mode"] == "supervised"  # the CPU preset trains from scratch


def test_unknown_option_is_rejected():
    with pytest.raises(SystemExit) as exc:
        main(["config", "show", "--bogus"])
    assert exc.value.code == 2


def test_config_error_names_key_and_closest(capsys):
    assert main(["config", "show", "--stage", "train", "train.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "train.lr" in err


def test_rollback_unknown_model_is_a_clear_error(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["rollback", "no-such-model", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err


def test_mae_on_a_preset_without_pretrain_section_uses_finetune_section():
    from vitpipe.cli import _has_section

    assert not _has_section("configs/fmnist_cpu.yaml", "pretrain")
    assert _has_section("configs/fmnist_gpu.yaml", "pretrain")
    assert _has_section(None, "pretrain")
