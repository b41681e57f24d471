"""`phivlm bench --quick`: the benchmark runs end to end on the tiny models and reports every figure.

No timing assertions (the machine is shared): only that each figure is present, finite and positive, that
the two contenders compute the same function (first losses, generated tokens) and that the analytic FLOP
count agrees with torch's FlopCounterMode.
"""
from __future__ import annotations

import json
import math

import pytest

from phivlm.cli import main

FIGURES = {
    "stage1": ["speedup", "speedup_cpu"],
    "stage2": ["speedup", "speedup_cpu"],
    "features": ["speedup"],
    "demo_features": ["speedup"],
    "generation": ["speedup", "speedup_tokens_per_s", "speedup_ttft"],
}
TRAINING = ["step_s", "step_cpu_s", "samples_per_s", "tokens_per_s", "flops_per_step", "forward_flops_per_step",
            "backward_flops_per_step", "achieved_gflops", "mfu", "mfu_vs_adjacent_probe", "trainable_params"]
PER_CONTENDER = {"stage1": TRAINING, "stage2": TRAINING, "features": ["images_per_s"],
                 "demo_features": ["images_per_s"],
                 "generation": ["total_s", "ttft_s", "tokens_per_s", "end_to_end_tokens_per_s"]}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_figure_present_finite_positive(quick):
    for fig, keys in FIGURES.items():
        assert fig in quick, fig
        for k in keys:
            assert positive(quick[fig][k]), (fig, k, quick[fig][k])
        for who in ("phivlm", "reference"):
            for k in PER_CONTENDER[fig]:
                assert positive(quick[fig][who][k]), (fig, who, k, quick[fig][who][k])
            mem = quick[fig][who]["memory"]
            assert positive(mem["held_mb"]) and positive(mem["peak_mb"]) and mem["step_mb"] >= 0, (fig, who, mem)
    peak = quick["matmul_peak"]
    assert positive(peak["peak_gflops"]) and positive(peak["median_gflops"])
    assert set(quick["goals"]) == {"stage1_speedup", "stage2_speedup", "stage2_mfu", "decode_speedup",
                                   "ttft_speedup"}
    for g in quick["goals"].values():
        assert positive(g["value"]) and isinstance(g["met"], bool)
    assert positive(quick["machine"]["threads"]) and len(quick["machine"]["loadavg_start"]) == 3


def test_contenders_compute_the_same_function(quick):
    for fig in ("stage1", "stage2"):
        s = quick[fig]
        assert s["loss_abs_diff"] < 0.05 * s["first_loss"]["reference"], s["first_loss"]  # bf16 rounding only
        # the reference does more matmul work (vision tower, logits everywhere), never less
        assert s["reference"]["flops_per_step"] > s["phivlm"]["flops_per_step"]
        # the same trained parameters, but for phivlm's separator vector (d_lm values)
        assert 0 < s["phivlm"]["trainable_params"] - s["reference"]["trainable_params"] <= 4096
    gen = quick["generation"]
    assert gen["tokens"] == {"phivlm": 4, "reference": 4}
    # tiny-llama decodes with models.decoder, to the same tokens as through transformers' decoder
    assert gen["decoder"] == "phivlm" and gen["same_tokens_as_transformers_decoder"] is True
    assert 0 <= gen["tokens_agreeing"] <= 4


def test_flop_count_matches_torch_flop_counter(quick):
    """The hooks' FLOPs equal FlopCounterMode's count of the same calls: Linear, convolution, and eager attention
    (phivlm's on the CPU); the reference's SDPA kernel is left out by both."""
    for fig in ("stage1", "stage2"):
        for who in ("phivlm", "reference"):
            c = quick[fig][who]["flop_check"]
            assert c["hooks_dense_flops"] == pytest.approx(c["flop_counter_mode_flops"], rel=0.01), (fig, who, c)


def test_table_renders(quick):
    from phivlm.bench import table

    text = table(quick)
    assert text.count("\n") >= 15 and "stage 2 (LoRA): samples/s" in text and "nan" not in text
    assert "feature caching, demo tower (tiny-dinov2, 56 px, 2×2 tiles): images/s" in text
    assert "stage 1 (LM frozen): first loss" in text and "compiled" not in text  # eager unless --compile


def test_compiled_training_steps_report_eager_losses(tmp_path):
    """``--compile``: phivlm's steps run compiled (timed after compiling), with the compiled loss of a batch
    checked against eager's at the same weights, and a table row for it."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--compile", "--figures", "stage1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    c = res["stage1"]["compiled"]
    assert positive(c["compile_s"]) and positive(c["loss"])
    assert c["loss_abs_diff"] < 0.05 * c["eager_loss"], c  # bf16 rounding only
    from phivlm.bench import table

    assert "stage 1 (LM frozen): compiled (--compile)" in table(res)
