"""Run configuration: YAML loading, flag precedence, errors, and ``--help`` of every subcommand."""
from __future__ import annotations

import argparse

import pytest
import yaml

from phivlm.cli import build_parser, main
from phivlm.config import RunConfig, config_from_args, stage_defaults
from phivlm.errors import PhivlmError


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["pretrain", *argv])


def test_defaults_then_yaml_then_flags(tmp_path):
    cfg_file = write(tmp_path / "run.yaml", {"train": {"lr": 0.5, "batch_size": 3, "output": "runs/x"},
                                            "model": {"projector": "linear"},
                                            "data": {"skip_bad": True, "max_length": 99}})
    cfg = config_from_args(parse("--config", cfg_file, "--lr", "0.1", "--no-skip-bad", "--epochs", "2"),
                           stage_defaults("pretrain"))
    assert cfg.train.lr == 0.1 and cfg.data.skip_bad is False and cfg.train.epochs == 2.0  # flags win
    assert (cfg.train.batch_size, cfg.train.output, cfg.model.projector, cfg.data.max_length) == \
        (3, "runs/x", "linear", 99)  # yaml beats defaults
    defaults = stage_defaults("pretrain")
    assert (cfg.data.template, cfg.tuning.lm_tuning, cfg.train.seed) == \
        (defaults.data.template, defaults.tuning.lm_tuning, defaults.train.seed)  # untouched: defaults
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.batch_size, int)


def test_flags_without_yaml_and_no_flags(tmp_path):
    assert config_from_args(parse(), stage_defaults("pretrain")) == stage_defaults("pretrain")
    cfg = config_from_args(parse("--batch-size", "5", "--skip-bad", "--vision", "tiny-clip"),
                           stage_defaults("pretrain"))
    assert (cfg.train.batch_size, cfg.data.skip_bad, cfg.model.vision) == (5, True, "tiny-clip")


def test_save_load_round_trip(tmp_path):
    cfg = stage_defaults("pretrain")
    cfg.train.lr, cfg.model.lm, cfg.tuning.gradient_checkpointing = 3e-4, "tiny-phi", True
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("data, needle", [({"train": {"lrr": 1}}, "unknown key train.lrr"),
                                          ({"trainer": {"lr": 1}}, "unknown config section 'trainer'"),
                                          ({"train": {"lr": "fast"}}, "train.lr: expected float"),
                                          ([1, 2], "expected a mapping")])
def test_bad_yaml_names_file_and_key(tmp_path, data, needle):
    path = write(tmp_path / "bad.yaml", data)
    for load in (lambda: config_from_args(parse("--config", path), stage_defaults("pretrain")),
                 lambda: RunConfig.load(path)):
        with pytest.raises(PhivlmError, match=needle) as e:
            load()
        assert "bad.yaml" in str(e.value)


@pytest.mark.parametrize("content", [None, "train: [1\n"])  # missing file, invalid YAML
def test_cli_reports_bad_config_without_traceback(tmp_path, capsys, content):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run.yaml: cannot read config" in err and "Traceback" not in err
    path = write(tmp_path / "bad.yaml", {"train": {"lrr": 1}})
    assert main(["pretrain", "--config", path]) == 2
    assert "train.lrr" in capsys.readouterr().err


def subcommands(parser: argparse.ArgumentParser, prefix=()):
    """Every leaf subcommand path, e.g. ("data", "synth"), ("pretrain",)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for name, child in subs[0].choices.items():
        yield from subcommands(child, prefix + (name,))


COMMANDS = list(subcommands(build_parser()))


def test_expected_subcommands_exist():
    assert {("data", "synth"), ("features",), ("pretrain",), ("finetune",), ("merge",), ("caption",), ("chat",),
            ("generate",), ("demo",)} <= set(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_works(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: phivlm {' '.join(cmd)}" in capsys.readouterr().out


FIXED = {("train", "fsdp"): "unknown --fsdp 'x'; valid: none, full, grad-op",
         ("train", "precision"): "unknown precision 'x'; valid: auto, bf16, fp32, fp16",
         ("train", "feedback"): "unknown --feedback 'x'; valid: greedy, sample",
         ("tuning", "lm_tuning"): "unknown --lm-tuning 'x'; valid: frozen, lora, qlora, full"}


@pytest.mark.parametrize("section, name", list(FIXED), ids=lambda v: v)
def test_validate_refuses_a_value_outside_a_fixed_set(section, name):
    cfg = RunConfig()
    setattr(getattr(cfg, section), name, "x")
    with pytest.raises(PhivlmError) as e:
        cfg.validate()
    assert str(e.value) == FIXED[section, name]


def test_validate_leaves_registry_names_to_the_registries():
    """A projector (template, objective, schedule) registered at run time is not refused by the config."""
    cfg = RunConfig()
    cfg.model.projector, cfg.data.template = "my_projector", "my_template"
    cfg.validate()
    stage_defaults("finetune").validate()


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_bad_values_fail_before_any_loading(tmp_path, capsys, how):
    """No data, no models: the run stops at the config, whether the value came from a flag or a YAML file."""
    argv = ["pretrain", "--output", str(tmp_path / "run")]
    argv += (["--lm-tuning", "adapters"] if how == "flag"
             else ["--config", write(tmp_path / "run.yaml", {"tuning": {"lm_tuning": "adapters"}})])
    assert main(argv) == 2
    assert "unknown --lm-tuning 'adapters'; valid: frozen, lora, qlora, full" in capsys.readouterr().err
