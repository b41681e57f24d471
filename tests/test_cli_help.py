"""``--help`` of every subcommand: a description, help text on every flag, the valid names of every flag that has
a fixed set; the config flags' help and choices come from the config fields (and the choices agree with the
registries); ``phivlm features`` takes its flags from the same config."""
from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from phivlm.cli import FEATURE_FIELDS, build_parser, main
from phivlm.config import RunConfig, stage_defaults


def leaf_parsers(parser: argparse.ArgumentParser, prefix=()):
    """(command path, parser) of every leaf subcommand, e.g. (("data", "synth"), <parser>)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaf_parsers(child, prefix + (name,))


LEAVES = dict(leaf_parsers(build_parser()))
CONFIG_FIELDS = {f"{s.name}.{f.name}": f for s in dataclasses.fields(RunConfig)
                 for f in dataclasses.fields(s.default_factory())}


def help_text(cmd: tuple[str, ...], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flag_blocks(text: str) -> dict[str, str]:
    """Each flag's invocation line in the help output -> the help text printed for it (same line or below)."""
    lines = text.splitlines()
    blocks: dict[str, str] = {}
    for i, line in enumerate(lines):
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if not m:
            continue
        invocation, rest = m.group(1), [m.group(2) or ""]
        for below in lines[i + 1:]:  # continuation lines: indented deeper, not another flag
            if not re.match(r"^ {3,}\S", below) or re.match(r"^  -", below):
                break
            rest.append(below.strip())
        for flag in re.findall(r"(?:^|, )(-{1,2}[\w-]+)", invocation):
            blocks[flag] = " ".join(r for r in rest if r).strip()
    return blocks


@pytest.mark.parametrize("cmd", list(LEAVES), ids=" ".join)
def test_every_subcommand_has_a_description_and_every_flag_help(cmd, capsys):
    parser = LEAVES[cmd]
    text = help_text(cmd, capsys)
    assert parser.description and "\n" not in parser.description, cmd
    assert " ".join(parser.description.split()) in " ".join(text.split())  # argparse wraps it at the width
    blocks = flag_blocks(text)
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in blocks, (cmd, flag)
            said = re.sub(r"\(default: [^)]*\)", "", blocks[flag]).strip()
            assert said, f"{' '.join(cmd)} {flag}: no help text"  # more than its default


@pytest.mark.parametrize("cmd", list(LEAVES), ids=" ".join)
def test_flags_with_choices_show_them(cmd, capsys):
    parser = LEAVES[cmd]
    text = help_text(cmd, capsys)
    shown = 0
    for action in parser._actions:
        field = CONFIG_FIELDS.get(action.dest)
        choices = list(action.choices or []) if not isinstance(action, argparse._SubParsersAction) else []
        choices = choices or list(field.metadata["choices"] if field else [])
        if choices and action.option_strings:
            assert f"{action.option_strings[-1]} {{{','.join(choices)}}}" in text, (cmd, action.dest)
            shown += 1
    if cmd in (("pretrain",), ("finetune",)):
        assert shown == sum(bool(f.metadata["choices"]) for f in CONFIG_FIELDS.values()) == 10


def test_every_config_field_has_help():
    for name, f in CONFIG_FIELDS.items():
        assert f.metadata.get("help", "").strip(), name


def test_config_choices_are_the_registries_names():
    from phivlm import config, runtime
    from phivlm.data.templates import TEMPLATES
    from phivlm.models.builtin import BUILTIN
    from phivlm.models.projector import PROJECTORS
    from phivlm.train import fsdp, objectives

    listed = {name: f.metadata["choices"] for name, f in CONFIG_FIELDS.items() if f.metadata["choices"]}
    fixed = {name for name, f in CONFIG_FIELDS.items() if f.metadata["fixed"]}
    assert {k: set(v) for k, v in listed.items() if k not in fixed} == {  # registry names: listed for --help
        "model.projector": set(PROJECTORS.names()),
        "data.template": {"auto", *TEMPLATES.names()},
        "train.objective": set(objectives.OBJECTIVES.names()),
        "train.tf_schedule": set(objectives.SCHEDULES.names()),
    }
    assert {k: listed[k] for k in fixed} == {  # fixed sets: defined in config, used from there
        "train.fsdp": config.FSDP_MODES, "train.precision": config.PRECISIONS, "train.feedback": config.FEEDBACK,
        "train.lr_schedule": config.LR_SCHEDULES, "model.tile_markers": config.TILE_MARKERS,
        "tuning.lm_tuning": config.LM_TUNINGS}
    assert runtime.PRECISIONS is config.PRECISIONS and objectives.FEEDBACK is config.FEEDBACK
    assert set(fsdp.RESHARD) == set(config.FSDP_MODES) - {"none"}
    # vision and LM: any hub id or folder, so no choices; their help names every built-in model
    helps = CONFIG_FIELDS["model.vision"].metadata["help"] + CONFIG_FIELDS["model.lm"].metadata["help"]
    assert set(BUILTIN.names()) == set(re.findall(r"[\w.-]+", helps)) & set(BUILTIN.names())


def test_help_shows_each_stage_preset(capsys):
    pre, fine = help_text(("pretrain",), capsys), help_text(("finetune",), capsys)
    for text, cfg in ((pre, stage_defaults("pretrain")), (fine, stage_defaults("finetune"))):
        blocks = flag_blocks(text)
        for flag, value in (("--lm-tuning", cfg.tuning.lm_tuning), ("--template", cfg.data.template),
                            ("--output", cfg.train.output), ("--lr", cfg.train.lr)):
            assert f"(default: {value})" in blocks[flag], (flag, blocks[flag])
    assert stage_defaults("finetune").tuning.lm_tuning == "lora" and stage_defaults("pretrain") == RunConfig()


def test_help_needs_no_torch():
    code = ("import sys\nfrom phivlm.cli import main\ntry:\n    main(['finetune', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr.strip() == "False", p.stderr
    assert "--lm-tuning {frozen,lora,qlora,full}" in p.stdout


def test_features_flags_are_the_config_fields(capsys):
    features = LEAVES[("features",)]
    dests = {a.dest for a in features._actions if "." in a.dest}
    assert dests == set(FEATURE_FIELDS)
    blocks, pre = flag_blocks(help_text(("features",), capsys)), flag_blocks(help_text(("pretrain",), capsys))
    for dest in FEATURE_FIELDS:
        flag = "--" + dest.split(".", 1)[1].replace("_", "-")
        assert blocks[flag] == pre[flag], flag  # the same field, the same help


def test_features_command_reads_flags_and_yaml(synth_data, tmp_path, capsys):
    from phivlm.data.features import FeatureStore

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"vision": "tiny-clip"}, "data": {"images": str(synth_data["images"])},
                                   "train": {"precision": "fp32", "device": "cpu"}}))
    root = tmp_path / "features"
    assert main(["features", "--config", str(cfg), "--data", str(synth_data["captions_train"]), "--limit", "4",
                 "--features", str(root), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 images cached in ")
    folder = out.split(" cached in ", 1)[1].split(" (", 1)[0]
    assert folder.startswith(str(root)) and len(FeatureStore(folder)) == 4
    assert main(["features", "--data", str(synth_data["captions_train"]), "--features", str(root)]) == 2
    assert "--images is required" in capsys.readouterr().err
