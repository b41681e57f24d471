"""models.decoder computes what transformers' decoder computes, step by step, in fp32 and under bf16 autocast."""
from __future__ import annotations

import pytest
import torch

from phivlm.generate import GenerationConfig, generate
from phivlm.models import decoder
from phivlm.models.lm import load_lm
from phivlm.models.vlm import IMAGE_ID, PhiVLM
from phivlm.runtime import autocast

CPU = torch.device("cpu")


def _vlm(lm: str = "tiny-llama") -> PhiVLM:
    model = load_lm(lm, attention="eager").requires_grad_(False)
    torch.manual_seed(0)  # the same projector for every call
    return PhiVLM(model, 8, 4).eval()


def _prompts(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch: per row 4 image slots then random text; (ids, mask, features)."""
    t = max(lengths) + 4
    ids, mask = torch.zeros(len(lengths), t, dtype=torch.long), torch.zeros(len(lengths), t, dtype=torch.long)
    feats = torch.empty(len(lengths), 4, 8)
    for r, n in enumerate(lengths):
        g = torch.Generator().manual_seed(n)  # a row's contents depend on its length only
        ids[r, t - n - 4:t - n] = IMAGE_ID
        ids[r, t - n:] = torch.randint(5, 100, (n,), generator=g)
        mask[r, t - n - 4:] = 1
        feats[r] = torch.randn(4, 8, generator=g)
    return ids, mask, feats


def _steps(vlm: PhiVLM, ids, mask, feats, n: int) -> list[torch.Tensor]:
    """Logits of the prefill and of ``n`` greedy steps after it."""
    logits, cache = vlm.prefill(ids, mask, feats)
    out = [logits]
    for _ in range(n):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits, cache = vlm.step(logits.argmax(-1), mask, cache)
        out.append(logits)
    return out


def test_fp32_steps_equal_transformers_steps_with_padding_and_cache_growth():
    ref, fast = _vlm(), _vlm()
    fast.prepare_decoding(None)
    assert fast.decoder is not None
    ids, mask, feats = _prompts([3, 9])  # row 0 is left-padded by 6
    with torch.no_grad():
        expected = _steps(ref, ids, mask, feats, 80)  # past adopt()'s 64 spare positions: the cache grows
        got = _steps(fast, ids, mask, feats, 80)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_padded_rows_decode_as_they_do_alone():
    fast = _vlm()
    fast.prepare_decoding(None)
    ids, mask, feats = _prompts([3, 9])
    alone = _prompts([3])
    with torch.no_grad():
        both = _steps(fast, ids, mask, feats, 6)
        one = _steps(fast, *alone, 6)
    for a, b in zip(one, both):
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_gives_the_same_greedy_tokens_as_transformers():
    ref, fast = _vlm(), _vlm()
    ref.hold_weights_in(torch.bfloat16)
    fast.prepare_decoding(torch.bfloat16)
    ids, mask, feats = _prompts([5, 11])
    gen = GenerationConfig(24)
    with torch.no_grad(), autocast(CPU, "bf16"):
        expected, got = generate(ref, ids, mask, feats, {-1}, gen), generate(fast, ids, mask, feats, {-1}, gen)
        a, b = _steps(ref, ids, mask, feats, 8), _steps(fast, ids, mask, feats, 8)
    assert got == expected and len(got[0]) == 24
    for x, y in zip(a, b):  # bf16 matmuls: a fused q/k/v product may round its last bit differently
        torch.testing.assert_close(y, x, rtol=0, atol=0.02)


def test_preparing_leaves_the_lms_own_forward_unchanged():
    vlm = _vlm()
    ids, mask, feats = _prompts([6])
    with torch.no_grad():
        before = vlm.base_lm(inputs_embeds=vlm.embed(ids, feats), attention_mask=mask).logits
        params = sum(p.numel() for p in vlm.parameters())
        vlm.prepare_decoding(None)
        after = vlm.base_lm(inputs_embeds=vlm.embed(ids, feats), attention_mask=mask).logits
    assert sum(p.numel() for p in vlm.parameters()) == params
    attn = vlm.base_lm.model.layers[0].self_attn  # q, k and v are views of one fused weight
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_products_equal_a_plain_matmul_packed_or_not(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    x = torch.randn(5, 64, generator=g).to(dtype)
    expected = torch.nn.functional.linear(x, weight, bias)
    packed = decoder._Product(weight, bias)
    assert (packed.packed is not None) == torch.backends.mkldnn.is_available()
    exact = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed(x), expected, **exact)

    def no_onednn(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(decoder._Product, "_checked", {})
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_onednn)
    plain = decoder._Product(weight, bias)
    assert plain.packed is None
    torch.testing.assert_close(plain(x), expected, **exact)


@pytest.mark.parametrize("case", ["phi", "lora"])
def test_other_lms_keep_the_transformers_path(case):
    from phivlm.config import TuningConfig
    from phivlm.loading.tuning import apply_tuning

    vlm = _vlm("tiny-phi" if case == "phi" else "tiny-llama")
    if case == "lora":  # unmerged adapters: their Linears are not plain
        vlm.lm = apply_tuning(vlm.lm, TuningConfig(lm_tuning="lora"), None, trainable=False)
    assert not decoder.supports(vlm.base_lm)
    vlm.prepare_decoding(None)
    assert vlm.decoder is None
    ids, mask, feats = _prompts([4])
    with torch.no_grad():
        out = generate(vlm, ids, mask, feats, {-1}, GenerationConfig(3))
    assert len(out[0]) == 3


def test_assistant_merges_lora_and_decodes_as_the_unmerged_model(untrained, synth_data, tmp_path):
    from pathlib import Path

    from phivlm.config import stage_defaults
    from phivlm.data.images import open_rgb
    from phivlm.infer import Assistant
    from phivlm.loading.checkpoint import load_checkpoint

    cfg = stage_defaults("pretrain")
    cfg.model.vision, cfg.model.lm, cfg.tuning.lm_tuning = "tiny-clip", "tiny-llama", "lora"

    def trained_adapter(vlm):  # LoRA B starts at zero: give the adapter an effect to merge
        for name, p in vlm.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)

    ckpt = untrained(tmp_path, cfg=cfg, seed=0, change=trained_adapter)
    fast = Assistant(ckpt, device="cpu", precision="fp32")
    assert fast.loaded.vlm.decoder is not None and not hasattr(fast.loaded.vlm.lm, "peft_config")
    unmerged = load_checkpoint(ckpt).vlm.eval()
    assert hasattr(unmerged.lm, "peft_config")
    images = [open_rgb(p) for p in sorted(Path(synth_data["images"]).glob("*.png"))[:2]]
    ids, mask = fast._batch([[("user", "<image>\nWhat is it?")], [("user", "<image>\nHow many shapes are there?")]])
    gen = GenerationConfig(10)
    with torch.no_grad():
        feats = fast.features(images)
        assert generate(fast.loaded.vlm, ids, mask, feats, {-1}, gen) == generate(unmerged, ids, mask, feats, {-1}, gen)
