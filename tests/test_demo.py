"""The demo's console output: held-out questions with the expected, the model's and the shuffled-image answers."""
from __future__ import annotations

import json
from pathlib import Path

from phivlm.demo import PRESETS, print_examples, stage_configs


def test_examples_show_expected_model_and_shuffled_answers_per_type(tmp_path, capsys):
    rows = [{"image": f"{i}.png", "prompt": f"q{i} about {t}?", "refs": [f"ref{i}"], "type": t,
             "model": f"ans{i}", "blind": "x", "shuffled": f"shuf{i}"}
            for i, t in enumerate(["color", "color", "color", "count", "shape"])]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_examples(path, per_type=2)
    out = capsys.readouterr().out.splitlines()
    body = [line.split() for line in out if line.startswith("q") and not line.startswith("question")]
    assert [b[0] for b in body] == ["q0", "q1", "q3", "q4"]  # at most 2 per type, in file order
    assert body[0][-3:] == ["ref0", "ans0", "shuf0"]
    assert "expected" in out[1] and "shuffled" in out[1]


def test_stage_configs_chain_stage1_into_lora_stage2(tmp_path):
    data = {k: str(tmp_path / k) for k in ("captions_train", "instruct_train", "instruct_val", "images")}
    s1, s2 = stage_configs(tmp_path, data, "default")
    p = PRESETS["default"]
    assert (s1.model.vision, s1.model.lm, s1.data.template, s1.tuning.lm_tuning) == (p.vision, p.lm, "plain", "lora")
    assert (s1.train.max_steps, s1.train.lr, s1.train.lm_lr) == (p.s1_steps, p.s1_lr, p.s1_lora_lr)
    assert (s1.train.lr_schedule, s2.train.lr_schedule) == (p.s1_schedule, "cosine") == ("constant", "cosine")
    assert s1.tuning.lora_dropout == p.lora_dropout and s1.model.image_tiles == p.image_tiles == 3
    assert (s2.data.data, s2.data.template, s2.tuning.lm_tuning, s2.tuning.lora_dropout) == (
        data["instruct_train"], p.s2_template, "lora", p.lora_dropout)
    assert (s2.train.max_steps, s2.train.lr, s2.train.lm_lr) == (p.s2_steps, p.s2_lr, p.s2_lr)
    assert s1.data.features == s2.data.features  # one feature cache serves both stages
    # the image layout is the model's: both stages (and every later command, from the checkpoint) share it
    assert (s1.model.tile_markers, s1.model.slot_embedding) == (s2.model.tile_markers, s2.model.slot_embedding) \
        == (p.tile_markers, p.slot_embedding) == ("after", True)


def test_stopped_at_eos_counts_answers_shorter_than_the_cap(tmp_path):
    from phivlm.demo import stopped_at_eos
    from phivlm.evaluate.run import MAX_NEW_TOKENS

    class Tok:  # one token per character: the cap is MAX_NEW_TOKENS["qa"] characters
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    cap = MAX_NEW_TOKENS["qa"]
    rows = [{"model": "red"}, {"model": "x" * (cap - 1)}, {"model": "x" * cap}, {"model": "y" * (cap + 3)}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert stopped_at_eos(path, Tok()) == 0.5


def test_host_report_names_precision_and_estimate(monkeypatch):
    from phivlm import demo

    monkeypatch.setattr(demo, "matmul_gflops", lambda precision: 100.0)
    monkeypatch.setattr(demo, "choose_precision", lambda p, d: ("fp32", "the CPU has no native bf16"))
    p = PRESETS["default"]
    text = demo.host_report(p)
    assert "precision: fp32 (the CPU has no native bf16)" in text
    assert f"~{p.ref_fp32_s * demo.REF_GFLOPS['fp32'] / 100.0 / 60:.0f} min" in text
    assert "threads" in text and "capability" in text
    assert "phivlm demo --tiny" in text  # a long fp32 run points to the quick check
    monkeypatch.setattr(demo, "matmul_gflops", lambda precision: 10_000.0)
    assert "--tiny" not in demo.host_report(p)


def test_estimates_scale_with_the_probe_of_the_precision_run():
    from phivlm.demo import REF_GFLOPS, estimated_s

    p = PRESETS["default"]
    assert estimated_s(p, "bf16", REF_GFLOPS["bf16"]) == p.ref_s
    assert estimated_s(p, "fp32", REF_GFLOPS["fp32"]) == p.ref_fp32_s
    assert estimated_s(p, "fp32", REF_GFLOPS["fp32"] / 2) == 2 * p.ref_fp32_s  # fp32 steps: matmul-bound
    assert estimated_s(p, "bf16", REF_GFLOPS["bf16"] / 4) == 2 * p.ref_s


def test_presets_run_the_pretrained_tower_in_the_hosts_precision():
    p = PRESETS["default"]
    assert (p.vision, p.lm) == ("dinov2-small", "smollm2-135m")
    assert PRESETS["long"].s1_steps > p.s1_steps and PRESETS["long"].s2_steps > p.s2_steps
    s1, _ = stage_configs(Path("/tmp/x"), {k: "x" for k in ("captions_train", "instruct_train", "images")}, "default")
    assert s1.train.precision == "auto"
    assert (s1.model.image_size, s1.model.image_tokens, s1.model.feature_layer) == (
        p.image_size, p.image_tokens, p.feature_layer)


def test_the_demo_compiles_where_the_host_can_and_says_so(monkeypatch):
    from phivlm import demo

    data = {k: "x" for k in ("captions_train", "instruct_train", "images")}
    monkeypatch.setattr(demo, "matmul_gflops", lambda precision: 100.0)
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo, "cpu_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(demo, "choose_precision", lambda p, d: ("bf16", "the CPU has AVX512-BF16"))
    s1, s2 = stage_configs(Path("/tmp/x"), data, "default")
    assert PRESETS["default"].compile and s1.train.compile and s2.train.compile
    assert "training: the LM's layers compiled" in demo.host_report(PRESETS["default"])
    assert not stage_configs(Path("/tmp/x"), data, "tiny")[0].train.compile  # seconds: compiling would dominate
    monkeypatch.setattr(demo, "cpu_compiler", lambda: None)  # no C++ compiler: the same recipe, uncompiled
    s1, s2 = stage_configs(Path("/tmp/x"), data, "default")
    assert not s1.train.compile and not s2.train.compile
    assert "training: uncompiled (no C++ compiler" in demo.host_report(PRESETS["default"])
    monkeypatch.setattr(demo, "cpu_compiler", lambda: "/usr/bin/g++")  # fp32: matmul-bound, compiling does not pay
    monkeypatch.setattr(demo, "choose_precision", lambda p, d: ("fp32", "the CPU has no native bf16"))
    assert not stage_configs(Path("/tmp/x"), data, "default")[0].train.compile
    assert "training: uncompiled (fp32 steps are matmul-bound" in demo.host_report(PRESETS["default"])
