"""Training objectives (phivlm.train.objectives): autoregressive vs standard, feedback, schedules, mixed."""
from __future__ import annotations

import argparse
import contextlib

import pytest
import torch

from helpers import log_records
from phivlm.config import RunConfig, TrainConfig, TuningConfig, add_config_args, config_from_args
from phivlm.data.dataset import Collator
from phivlm.data.templates import encode, encode_prompt, get_template
from phivlm.generate import GenerationConfig, generate
from phivlm.models.lm import load_lm
from phivlm.models.vlm import PhiVLM
from phivlm.errors import PhivlmError
from phivlm.train import objectives
from phivlm.train.objectives import SCHEDULES, autoregressive_loss, build_objective, split_prompt
from phivlm.loading.tuning import apply_tuning

N_PATCHES, D_VISION = 4, 32
CONVERSATIONS = [
    [("user", "<image>\nwhat shape is there?"), ("assistant", "a red circle"),
     ("user", "and the color of the square?"), ("assistant", "blue")],
    [("user", "describe the picture\n<image>"),
     ("assistant", "two small green triangles at the top left of the image")],
    [("user", "<image> how many objects?"), ("assistant", "three")],
]


class _Store:
    """Feature-store stand-in: deterministic random features per image name."""

    def get(self, names):
        return torch.stack([torch.randn(N_PATCHES, D_VISION, generator=torch.Generator().manual_seed(int(n[3:])))
                            for n in names])


def make_vlm(lm_name: str, tuning: str = "full", checkpointing: bool = False, lora_dropout: float = 0.0) -> PhiVLM:
    torch.manual_seed(0)
    lm = apply_tuning(load_lm(lm_name), TuningConfig(lm_tuning=tuning, lora_rank=4, lora_dropout=lora_dropout,
                                                     gradient_checkpointing=checkpointing))
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.1)
    return PhiVLM(lm, D_VISION, N_PATCHES, "residual").train()


def make_batch(tok, conversations, template: str = "phi") -> dict:
    """A right-padded batch from the real template and Collator."""
    items = []
    for i, turns in enumerate(conversations):
        enc = encode(get_template(template), tok, turns, N_PATCHES)
        items.append((f"img{i}", enc.input_ids, enc.labels))
    return Collator(_Store(), tok.pad_token_id)(items)


def grads(vlm: PhiVLM) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad(set_to_none=True)
    return out


def assert_same_loss_and_grads(vlm: PhiVLM, batch: dict, run) -> None:
    """``run()`` -> (autoregressive loss, batch whose standard loss it must equal); also compares gradients."""
    loss, ref_batch = run()
    loss.backward()
    g_ar = grads(vlm)
    standard = vlm(**ref_batch)
    standard.backward()
    g_std = grads(vlm)
    assert abs(loss.item() - standard.item()) < 1e-5
    assert set(g_ar) == set(g_std) and any(n.startswith("projector.") for n in g_std)
    assert any(n.startswith("lm.") for n in g_std) and "separator" in g_std
    for n in g_std:
        assert torch.allclose(g_ar[n], g_std[n], atol=1e-5, rtol=0), n


def with_fed_tokens(batch: dict, fed: torch.Tensor, fed_mask: torch.Tensor) -> dict:
    """The batch with the tokens the autoregressive loop fed as inputs (labels unchanged)."""
    first = split_prompt(batch)[2]
    ids = batch["input_ids"].clone()
    for r in range(len(ids)):
        k = int(fed_mask[r].sum())
        ids[r, int(first[r]) : int(first[r]) + k] = fed[r, :k]
    return {**batch, "input_ids": ids}


def ar_run(vlm, batch, tf_rate, results: list | None = None, **kw):
    def run():
        res = autoregressive_loss(vlm, batch, tf_rate, **kw)
        if results is not None:
            results.append(res)
        return res.loss, with_fed_tokens(batch, res.fed, res.fed_mask)
    return run


def test_split_prompt_left_aligns_prompts_and_keeps_all_targets(tiny_tok):
    batch = make_batch(tiny_tok["tiny-phi"], CONVERSATIONS)
    prompt, pmask, first, cont, labels, live = split_prompt(batch)
    ids, lab = batch["input_ids"], batch["labels"]
    for r in range(len(CONVERSATIONS)):
        f = int(first[r])
        assert lab[r, :f].eq(-100).all() and lab[r, f] != -100
        assert prompt[r, -f:].tolist() == ids[r, :f].tolist() and pmask[r].sum() == f
        n = int(live[r].sum())
        assert cont[r, :n].tolist() == ids[r, f : f + n].tolist()
        assert labels[r, :n].tolist() == lab[r, f : f + n].tolist()
        assert lab[r, f + n :].eq(-100).all()  # nothing labelled is left out
    assert live.sum(1).unique().numel() == 3  # rows of different target lengths
    assert (labels[0, : int(live[0].sum())] == -100).any()  # the 2nd user turn sits between targets


@pytest.mark.parametrize("lm_name,tuning", [("tiny-phi", "full"), ("tiny-llama", "lora")])
def test_teacher_forced_equals_standard(tiny_tok, lm_name, tuning):
    vlm = make_vlm(lm_name, tuning)
    batch = make_batch(tiny_tok[lm_name], CONVERSATIONS)
    assert_same_loss_and_grads(vlm, batch, lambda: (autoregressive_loss(vlm, batch, 1.0).loss, batch))


@pytest.mark.parametrize("tf_rate", [0.0, 0.5])
def test_fed_predictions_equal_a_standard_pass_over_the_fed_tokens(tiny_tok, tf_rate):
    """Every position fed a prediction (p = 0) and a mix (p = 0.5): the loss and gradients are exactly a
    causal pass over the tokens fed, with the ground truth as targets."""
    vlm = make_vlm("tiny-phi")
    batch = make_batch(tiny_tok["tiny-phi"], CONVERSATIONS)
    gen, results = torch.Generator().manual_seed(3), []
    assert_same_loss_and_grads(vlm, batch, ar_run(vlm, batch, tf_rate, results, generator=gen))
    cont, cont_labels = split_prompt(batch)[3:5]
    targets = cont_labels[:, :-1] != -100
    own = (results[0].fed != cont[:, :-1])[targets]
    assert own.any() and (tf_rate == 0.0 or not own.all())  # predictions fed; at 0.5 also ground truth


@pytest.mark.parametrize("lm_name", ["tiny-phi", "tiny-llama"])
def test_free_running_greedy_feeds_what_generate_produces(tiny_tok, lm_name):
    tok = tiny_tok[lm_name]
    vlm = make_vlm(lm_name)
    batch = make_batch(tok, CONVERSATIONS[1:])
    with torch.no_grad():
        fed, fed_mask = autoregressive_loss(vlm, batch, 0.0, "greedy")[1:]
    cont = split_prompt(batch)[3]
    prompts = [encode_prompt(get_template("phi"), tok, turns[:1], N_PATCHES) for turns in CONVERSATIONS[1:]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = generate(vlm, ids, mask, batch["image_features"], {tok.eos_token_id},
                   GenerationConfig(max_new_tokens=fed.shape[1]))
    for r, gen in enumerate(out):
        n = int(fed_mask[r].sum())
        mine = fed[r, :n].tolist()
        assert n >= 2 and mine != cont[r, :n].tolist()  # the model's own tokens were fed
        assert mine[: len(gen)] == gen[:n]
        if len(gen) < n:  # generation stopped at EOS
            assert mine[len(gen)] == tok.eos_token_id


def test_sampled_feedback_is_seeded_and_mixes_truth_and_predictions(tiny_tok):
    vlm = make_vlm("tiny-llama")
    batch = make_batch(tiny_tok["tiny-llama"], CONVERSATIONS)
    _, cont, _ = split_prompt(batch)[2:5]
    with torch.no_grad():
        runs = [autoregressive_loss(vlm, batch, 0.5, "sample", torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0].fed, runs[1].fed) and not torch.equal(runs[0].fed, runs[2].fed)
    same = (runs[0].fed == cont[:, :-1])[runs[0].fed_mask]
    assert 0 < same.float().mean() < 1


def test_phase_one_decodes_without_a_graph_and_checkpointing_keeps_the_gradients(tiny_tok):
    """Phase 1: one decoder call per position fed a prediction, without autograd and in eval mode (none at
    p = 1). Phase 2: the standard pass, checkpointed like it, with the standard gradients over the fed tokens."""
    vlm = make_vlm("tiny-llama", "lora", checkpointing=True)
    batch = make_batch(tiny_tok["tiny-llama"], CONVERSATIONS)
    calls = []  # per call of the first layer's attention: (grad mode, training, output in a graph)
    attn = vlm.base_lm.model.layers[0].self_attn
    handle = attn.register_forward_hook(
        lambda m, args, out: calls.append((torch.is_grad_enabled(), m.training, out[0].grad_fn is not None)))
    res = autoregressive_loss(vlm, batch, 0.0)
    cont_labels = split_prompt(batch)[4]
    steps = int((cont_labels[:, :-1] != -100).any(0).sum())  # p = 0: every fed target position
    assert steps >= 2 and calls == [(False, False, False)] * steps + [(True, True, True)]
    res.loss.backward()
    assert len(calls) == steps + 2  # backward replays only phase 2's forward
    g_ar = grads(vlm)
    calls.clear()
    standard = vlm(**with_fed_tokens(batch, res.fed, res.fed_mask))
    standard.backward()
    g_std = grads(vlm)
    assert abs(res.loss.item() - standard.item()) < 1e-5 and set(g_ar) == set(g_std)
    assert any("lora_A" in n and v.abs().sum() > 0 for n, v in g_ar.items())
    for n in g_std:
        assert torch.allclose(g_ar[n], g_std[n], atol=1e-5, rtol=0), n
    calls.clear()
    autoregressive_loss(vlm, batch, 1.0)
    assert calls == [(True, True, True)]  # p = 1: no phase 1
    handle.remove()


def test_dropout_does_not_change_phase_one_choices(tiny_tok, monkeypatch):
    """Phase 1 runs in eval mode: with dropout in the model, the fed predictions are the eval-mode ones
    whatever the dropout draws; phase 2 still trains with dropout; every module's own mode comes back."""
    vlm = make_vlm("tiny-llama", "lora", lora_dropout=0.5)
    batch = make_batch(tiny_tok["tiny-llama"], CONVERSATIONS)
    with torch.no_grad():
        vlm.eval()
        ref = autoregressive_loss(vlm, batch, 0.0)
        vlm.train()
        vlm.projector.eval()  # a model in mixed modes keeps them
        modes = {n: m.training for n, m in vlm.named_modules()}
        runs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            runs.append(autoregressive_loss(vlm, batch, 0.0))
            assert {n: m.training for n, m in vlm.named_modules()} == modes
        assert all(torch.equal(r.fed, ref.fed) for r in runs)
        assert abs(runs[0].loss - runs[1].loss) > 1e-4  # the loss pass does use dropout
        monkeypatch.setattr(objectives, "_eval_mode", lambda m: contextlib.nullcontext())
        feds = []
        for seed in (0, 1):  # control: decoded in training mode, dropout would change the choices
            torch.manual_seed(seed)
            feds.append(autoregressive_loss(vlm, batch, 0.0).fed)
        assert not torch.equal(feds[0], feds[1])


def test_qlora_with_checkpointing_under_bf16(tiny_tok):
    pytest.importorskip("bitsandbytes")
    from phivlm.loading.checkpoint import build_vlm

    cfg = RunConfig()
    cfg.model.lm, cfg.tuning.lm_tuning, cfg.tuning.gradient_checkpointing = "tiny-llama", "qlora", True
    vlm, tok = build_vlm(cfg, D_VISION, N_PATCHES, torch.device("cpu"))
    vlm.train()
    batch = make_batch(tok, CONVERSATIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = autoregressive_loss(vlm, batch, 0.5, generator=torch.Generator().manual_seed(0))
    res.loss.backward()
    g = grads(vlm)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = vlm(**with_fed_tokens(batch, res.fed, res.fed_mask))
    assert res.loss.item() == pytest.approx(ref.item(), rel=1e-3)
    assert any("lora_B" in n and v.abs().sum() > 0 for n, v in g.items()) and g["separator"].abs().sum() > 0


def test_phase_one_casts_weights_once_under_autocast_and_changes_nothing(tiny_tok, monkeypatch):
    """Under bf16 autocast phase 1 decodes with one bf16 copy of each fp32 Linear weight (autocast would
    re-cast them at every step): same fed tokens, loss and gradients, and the fp32 parameters come back."""
    vlm = make_vlm("tiny-llama", "lora")
    batch = make_batch(tiny_tok["tiny-llama"], CONVERSATIONS)
    params = dict(vlm.named_parameters())
    head_dtypes = []
    handle = vlm.base_lm.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: head_dtypes.append(m.weight.dtype))
    results = []
    for cast_once in (True, False):
        if not cast_once:
            monkeypatch.setattr(objectives, "_linear_weights_cast_once", lambda m: contextlib.nullcontext())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = autoregressive_loss(vlm, batch, 0.0)
        res.loss.backward()
        results.append((res.loss.detach(), res.fed, grads(vlm)))
        if cast_once:
            steps = len(head_dtypes) - 1
            assert steps >= 2 and head_dtypes == [torch.bfloat16] * steps + [torch.float32]
    handle.remove()
    assert dict(vlm.named_parameters()) == params  # the original fp32 parameters are back
    assert all(p.dtype == torch.float32 for p in params.values())
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(results[0][2][n], results[1][2][n]) for n in results[0][2])


def test_schedules():
    values = {name: [SCHEDULES.get(name)(1.0, 0.2, s, 100) for s in (0, 50, 100, 200)] for name in SCHEDULES.names()}
    assert values["constant"] == [1.0] * 4
    assert values["linear"] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert values["exponential"] == pytest.approx([1.0, 0.28, 0.208, 0.20008])
    cfg = TrainConfig(objective="autoregressive", tf_schedule="linear", tf_start=1.0, tf_end=0.0)
    assert build_objective(cfg).tf_rate(25, 100) == pytest.approx(0.75)  # tf_decay_steps 0 = the whole run
    assert build_objective(TrainConfig(objective="standard")).tf_rate(25, 100) is None


def test_mixed_uses_standard_for_its_share_of_steps(tiny_tok):
    mixed = build_objective(TrainConfig(objective="mixed", mixed_standard_fraction=0.25))
    assert [s for s in range(12) if mixed.uses_standard(s)] == [3, 7, 11]
    third = build_objective(TrainConfig(objective="mixed", mixed_standard_fraction=1 / 3))
    assert sum(third.uses_standard(s) for s in range(300)) == 100
    assert not any(build_objective(TrainConfig(objective="mixed", mixed_standard_fraction=0.0)).uses_standard(s)
                   for s in range(50))
    vlm = make_vlm("tiny-llama")
    batch = make_batch(tiny_tok["tiny-llama"], CONVERSATIONS)
    free = build_objective(TrainConfig(objective="mixed", mixed_standard_fraction=0.25, tf_schedule="constant",
                                       tf_start=0.0))
    with torch.no_grad():
        standard = vlm(**batch)
        assert free(vlm, batch, 3, 12) == standard
        assert abs(free(vlm, batch, 2, 12) - standard) > 1e-3


def test_config_flags_and_errors():
    parser = argparse.ArgumentParser()
    add_config_args(parser, RunConfig())
    args = parser.parse_args(["--objective", "mixed", "--tf-schedule", "linear", "--tf-start", "0.9", "--tf-end",
                              "0.1", "--tf-decay-steps", "500", "--feedback", "sample",
                              "--mixed-standard-fraction", "0.3"])
    t = config_from_args(args, RunConfig()).train
    assert (t.objective, t.tf_schedule, t.tf_start, t.tf_end, t.tf_decay_steps, t.feedback,
            t.mixed_standard_fraction) == ("mixed", "linear", 0.9, 0.1, 500, "sample", 0.3)
    for bad, match in [(dict(objective="beam"), "unknown objective 'beam'"),
                       (dict(tf_schedule="cosine"), "unknown teacher-forcing schedule 'cosine'")]:
        with pytest.raises(PhivlmError, match=match):  # registry names: the registries check them
            build_objective(TrainConfig(**bad))
    for bad, match in [(dict(feedback="top-k"), r"unknown --feedback 'top-k'; valid: greedy, sample"),
                       (dict(tf_end=1.5), r"--tf-end must be in \[0, 1\], got 1.5"),
                       (dict(mixed_standard_fraction=-0.1), "--mixed-standard-fraction must be in"),
                       (dict(tf_decay_steps=-1), "--tf-decay-steps must be >= 0, got -1")]:
        with pytest.raises(PhivlmError, match=match):
            RunConfig(train=TrainConfig(**bad)).validate()


def test_training_loop_runs_mixed_objective_and_logs_the_rate(synth_data, tmp_path):
    from phivlm.train.loop import train

    cfg = RunConfig()
    cfg.model.vision, cfg.model.lm = "tiny-clip", "tiny-llama"
    cfg.data.data, cfg.data.images = str(synth_data["instruct_train"]), str(synth_data["images"])
    cfg.data.template = "auto"
    cfg.data.features, cfg.data.limit = str(tmp_path / "feat"), 16
    cfg.train.output, cfg.train.max_steps, cfg.train.batch_size, cfg.train.log_every = str(tmp_path / "run"), 4, 4, 1
    cfg.train.objective, cfg.train.tf_schedule, cfg.train.tf_decay_steps = "mixed", "linear", 4
    train(cfg)
    recs = log_records(tmp_path / "run")
    train_recs = [r for r in recs if "loss" in r]
    assert [r["tf_rate"] for r in train_recs] == pytest.approx([1.0, 0.875, 0.75, 0.625])
