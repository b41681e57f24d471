"""Inference speed-ups change no number: weights held in the compute dtype, last-position logits only."""
from __future__ import annotations

import copy

import torch

from phivlm.generate import GenerationConfig, generate
from phivlm.infer import Assistant
from phivlm.runtime import autocast
from phivlm.loading.checkpoint import load_checkpoint


def test_weights_held_in_bf16_give_the_same_logits_and_tokens(tiny_checkpoint, synth_data):
    from pathlib import Path

    from phivlm.data.images import open_rgb
    from phivlm.data.templates import encode_prompt, get_template

    loaded = load_checkpoint(tiny_checkpoint)
    plain, held = loaded.vlm.eval(), copy.deepcopy(loaded.vlm).eval()
    held.hold_weights_in(torch.bfloat16)
    base = held.base_lm
    assert base.get_input_embeddings().weight.dtype == torch.float32  # the residual stream stays fp32
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.bfloat16 for m in base.modules() if isinstance(m, torch.nn.Linear))

    tower, tok = loaded.tower, loaded.tok
    image = open_rgb(next(Path(synth_data["images"]).glob("*.png")))
    template = get_template(loaded.cfg.data.template)
    ids = torch.tensor([encode_prompt(template, tok, [("user", "<image>\nWhat is it?")], tower.num_patches)])
    mask = torch.ones_like(ids)
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, "bf16"):
        feats = tower(tower.preprocess([image])).float()
        a, _ = plain.prefill(ids, mask, feats)
        b, _ = held.prefill(ids, mask, feats)
        gen = GenerationConfig(12)
        out_a = generate(plain, ids, mask, feats, {-1}, gen)
        out_b = generate(held, ids, mask, feats, {-1}, gen)
    assert torch.equal(a, b)  # autocast computed in bf16 from the same bf16 values of the weights
    assert out_a == out_b and len(out_a[0]) == 12


def test_last_position_logits_equal_the_full_forward(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    vlm, tok, tower = loaded.vlm.eval(), loaded.tok, loaded.tower
    from phivlm.data.templates import encode_prompt, get_template

    ids = torch.tensor([encode_prompt(get_template(loaded.cfg.data.template), tok, [("user", "<image>\nHi")],
                                      tower.num_patches)])
    mask = torch.ones_like(ids)
    feats = torch.randn(1, tower.num_patches, tower.hidden_size)
    with torch.no_grad():
        logits, _ = vlm.prefill(ids, mask, feats)
        full = vlm.base_lm(inputs_embeds=vlm.embed(ids, feats), attention_mask=mask).logits[:, -1].float()
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_assistant_holds_lm_weights_in_its_compute_dtype(tiny_checkpoint):
    """Every inference command goes through Assistant: bf16 holds the LM's Linear weights in bf16 (the embeddings
    stay fp32), fp32 leaves them as loaded."""
    def linear_dtypes(a: Assistant) -> set:
        return {m.weight.dtype for m in a.loaded.vlm.base_lm.modules() if isinstance(m, torch.nn.Linear)}

    bf16 = Assistant(tiny_checkpoint, device="cpu", precision="bf16")
    assert linear_dtypes(bf16) == {torch.bfloat16}
    assert bf16.loaded.vlm.base_lm.get_input_embeddings().weight.dtype == torch.float32
    assert linear_dtypes(Assistant(tiny_checkpoint, device="cpu", precision="fp32")) == {torch.float32}
