"""Projectors, the multimodal model (splicing, loss, KV-cached generation) and the frozen vision tower."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phivlm.data.images import open_rgb
from phivlm.data.templates import IMAGE_TOKEN, encode, encode_prompt, get_template
from phivlm.generate import GenerationConfig, generate
from phivlm.models import builtin
from phivlm.models.lm import load_lm
from phivlm.models.projector import PROJECTORS, ResidualBlock, ResidualProjector, SlotEmbedding, build_projector
from phivlm.models.vision import VisionTower
from phivlm.models.vlm import IGNORE, IMAGE_ID, SEP_ID, PhiVLM
from phivlm.errors import PhivlmError

P, D_V = 49, 32  # tiny-clip: 7x7 patches of width 32
TEMPLATE = {"tiny-phi": "phi", "tiny-llama": "chat"}


@pytest.fixture(scope="session")
def vlms():
    """One fp32 PhiVLM per tiny LM (residual projector), built once.

    The LM matrices are redrawn with a larger std: at the default init every greedy step picks the
    same token, which would make the generation tests blind.
    """
    out = {}
    for name in ("tiny-phi", "tiny-llama"):
        torch.manual_seed(0)
        lm = load_lm(name)
        with torch.no_grad():
            for w in lm.parameters():
                if w.ndim == 2:
                    w.normal_(0, 0.2)
        out[name] = PhiVLM(lm, D_V, P, "residual", 2).eval()
    return out


def conversation(q: str, a: str | None = None):
    turns = [("user", f"{IMAGE_TOKEN}\n{q}")]
    return turns + [("assistant", a)] if a is not None else turns


# -- projectors --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "residual"])
def test_projector_shapes(name):
    proj = build_projector(name, D_V, 64, 2)
    assert proj(torch.randn(2, P, D_V)).shape == (2, P, 64)


def test_residual_projector_structure():
    torch.manual_seed(0)
    proj = build_projector("residual", D_V, 64, 3)
    assert isinstance(proj, ResidualProjector) and isinstance(proj.proj, nn.Linear)
    assert (proj.proj.in_features, proj.proj.out_features) == (D_V, 64)
    assert len(proj.blocks) == 3
    for block in proj.blocks:
        assert isinstance(block, ResidualBlock) and isinstance(block.norm, nn.LayerNorm)
        assert block.norm.normalized_shape == (64,)
        assert (block.fc1.in_features, block.fc1.out_features, block.fc2.out_features) == (64, 64, 64)
    x = torch.randn(2, P, D_V)
    ref = proj.proj(x)
    for b in proj.blocks:  # x + Linear(GELU(Linear(LN(x))))
        ref = ref + b.fc2(F.gelu(b.fc1(F.layer_norm(ref, (64,), b.norm.weight, b.norm.bias, b.norm.eps))))
    torch.testing.assert_close(proj(x), ref)
    assert len(build_projector("residual", D_V, 64, 0).blocks) == 0


class Times(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "residual"])
def test_slot_embedding_adds_each_slots_vector_scaled_by_the_token(name):
    torch.manual_seed(0)
    proj = build_projector(name, D_V, 64, 2, slots=P)
    assert isinstance(proj, SlotEmbedding) and proj.slots.shape == (P, 64)
    x = torch.randn(2, P, D_V)
    x[:, 1] = x[:, 0]  # the same features in two slots
    with torch.no_grad():
        y, base = proj(x), proj.projector(x)
        torch.testing.assert_close(y, base + base.pow(2).mean(-1, keepdim=True).sqrt() * proj.slots)
        assert not torch.allclose(y[:, 0], y[:, 1], atol=1e-3)  # where a token lies is part of it
        # a projector whose tokens are 100x larger gets 100x larger slot vectors: the same share of each token
        bigger = SlotEmbedding(nn.Sequential(proj.projector, Times(100.0)), P, 64)
        bigger.slots.copy_(proj.slots)
        torch.testing.assert_close(bigger(x) / 100, y)


def test_vlm_with_slot_embedding_saves_and_folds_its_slots():
    torch.manual_seed(0)
    vlm = PhiVLM(load_lm("tiny-llama"), D_V, P, "residual", 2, slot_embedding=True)
    assert "projector.slots" in vlm.trainable_state_dict()
    feats = torch.randn(64, P, D_V) * 3 + 1
    vlm.feature_norm.fit(feats)
    with torch.no_grad():
        normed = vlm.projector(vlm.feature_norm(feats[:2]))
        vlm.fold_feature_norm()  # into the first Linear, inside the slot wrapper
        torch.testing.assert_close(vlm.projector(feats[:2]), normed, atol=1e-4, rtol=1e-4)
    assert "projector.slots" not in PhiVLM(load_lm("tiny-llama"), D_V, P).trainable_state_dict()


def test_unknown_projector_lists_valid_names():
    with pytest.raises(PhivlmError, match="'conv'") as e:
        build_projector("conv", D_V, 64, 2)
    assert all(n in str(e.value) for n in ("linear", "mlp2x_gelu", "residual"))
    assert PROJECTORS.names() == ["linear", "mlp2x_gelu", "residual"]


# -- embedding splice --------------------------------------------------------------------------

def test_embed_places_features_separator_and_text(vlms):
    vlm = vlms["tiny-phi"]
    rows = [[5, 6] + [IMAGE_ID] * P + [SEP_ID] + [7, 8, 9, 10],
            [IMAGE_ID] * P + [SEP_ID] + [11]]
    width, pad = max(map(len, rows)), 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    feats = torch.randn(2, P, D_V)
    with torch.no_grad():
        got = vlm.embed(ids, feats)
        table = vlm.base_lm.get_input_embeddings().weight
        for r, row in enumerate(ids.tolist()):  # slow reference: one position at a time
            img = vlm.projector(feats[r])
            k = 0
            for t, tok in enumerate(row):
                if tok == IMAGE_ID:
                    want, k = img[k], k + 1
                elif tok == SEP_ID:
                    want = vlm.separator
                else:
                    want = table[tok]
                torch.testing.assert_close(got[r, t], want, rtol=1e-6, atol=1e-6)
            assert k == P
    with pytest.raises(ValueError, match="image slots"):
        vlm.embed(ids, feats[:1])


# -- loss --------------------------------------------------------------------------------------

def batch(tok, template, convs, left: bool):
    seqs = [(encode(template, tok, c, P).input_ids, encode(template, tok, c, P).labels) if c[-1][0] == "assistant"
            else (encode_prompt(template, tok, c, P), None) for c in convs]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), IGNORE)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, lab) in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, sl], mask[r, sl] = torch.tensor(s), 1
        if lab is not None:
            labels[r, sl] = torch.tensor(lab)
    return ids, mask, labels


@pytest.mark.parametrize("lm", ["tiny-phi", "tiny-llama"])
def test_loss_equals_full_logits_cross_entropy(vlms, tiny_tok, lm):
    vlm, tok = vlms[lm], tiny_tok[lm]
    convs = [conversation("What color is the circle?", "The circle is red."),
             conversation("How many?", "There are 3 shapes: a red circle, a blue square and a green triangle.")]
    ids, mask, labels = batch(tok, get_template(TEMPLATE[lm]), convs, left=False)
    assert mask[0].sum() < mask[1].sum()  # really padded
    torch.manual_seed(1)
    feats = torch.randn(2, P, D_V)
    with torch.no_grad():
        loss = vlm(ids, mask, feats, labels)
        logits = vlm.base_lm(inputs_embeds=vlm.embed(ids, feats), attention_mask=mask).logits
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


# -- generation --------------------------------------------------------------------------------

def naive_greedy(vlm, prompt: list[int], feats, n: int, eos: int) -> list[int]:
    """No cache: re-run the whole sequence for every new token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = vlm.base_lm(inputs_embeds=vlm.embed(torch.tensor([ids]), feats)).logits[0, -1]
            tok = int(logits.argmax())
            if tok == eos:
                break
            out.append(tok)
            ids.append(tok)
    return out


@pytest.mark.parametrize("lm", ["tiny-phi", "tiny-llama"])
def test_greedy_generation_is_batch_invariant_and_cache_correct(vlms, tiny_tok, lm):
    vlm, tok, template = vlms[lm], tiny_tok[lm], get_template(TEMPLATE[lm])
    convs = [conversation("What color is the circle?"),
             conversation("Where is the large blue square in the picture? Describe the image.")]
    ids, mask, _ = batch(tok, template, convs, left=True)
    assert mask[0, 0] == 0 and mask[1, 0] == 1  # left padded
    torch.manual_seed(2)
    feats = torch.randn(2, P, D_V)
    gen = GenerationConfig(max_new_tokens=10)
    eos = tok.eos_token_id
    together = generate(vlm, ids, mask, feats, {eos}, gen)
    for r, conv in enumerate(convs):
        prompt = encode_prompt(template, tok, conv, P)
        alone = generate(vlm, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                         feats[r:r + 1], {eos}, gen)[0]
        assert together[r] == alone
        assert alone == naive_greedy(vlm, prompt, feats[r:r + 1], gen.max_new_tokens, eos)
    # the comparison covers several distinct cached steps, not only the prefill
    assert all(len(o) >= 3 and len(set(o)) >= 3 for o in together) and together[0] != together[1]


# -- vision tower ------------------------------------------------------------------------------

def test_tower_is_frozen(tiny_tower, synth_data):
    assert not any(p.requires_grad for p in tiny_tower.parameters())
    tiny_tower.train()
    assert not tiny_tower.training and not tiny_tower.model.training
    images = [open_rgb(p) for p in sorted(Path(synth_data["images"]).glob("*.png"))[:2]]
    pixels = tiny_tower.preprocess(images)
    assert pixels.shape == (2, 3, 224, 224)
    feats = tiny_tower(pixels)
    assert feats.shape == (2, P, tiny_tower.hidden_size) == (2, 49, D_V)
    assert not feats.requires_grad and tiny_tower.num_patches == P
    assert tiny_tower.random_weights


@pytest.mark.parametrize("layer", [-2, -1, 0, 1])
def test_feature_layer_matches_unmodified_clip(tiny_tower, layer):
    from transformers import CLIPVisionModel

    tower = tiny_tower if layer == -2 else VisionTower("tiny-clip", feature_layer=layer)
    clip = CLIPVisionModel.from_pretrained(builtin.resolve("tiny-clip")).eval()
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
    torch.testing.assert_close(tower(pixels), ref)
    n_layers = clip.config.num_hidden_layers
    assert len(tower.model.vision_model.encoder.layers if hasattr(tower.model, "vision_model")
               else tower.model.encoder.layers) == layer % (n_layers + 1)  # later layers never run


# -- feature standardisation -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "residual"])
def test_feature_norm_standardises_and_folds_into_the_projector(name):
    torch.manual_seed(0)
    lm = load_lm("tiny-llama")
    vlm = PhiVLM(lm, D_V, P, name, 2)
    shared = torch.randn(D_V) * 5  # features dominated by one shared vector, as with a random tower
    feats = shared + 0.1 * torch.randn(64, P, D_V)
    x = feats[:4]
    before = vlm.projector(x)
    assert torch.allclose(vlm.projector(vlm.feature_norm(x)), before)  # identity until fitted
    vlm.feature_norm.fit(feats)
    z = vlm.feature_norm(feats).reshape(-1, D_V)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-4
    with torch.no_grad():
        normed = vlm.projector(vlm.feature_norm(x))
        vlm.fold_feature_norm()
        assert torch.equal(vlm.feature_norm(x), x)  # identity again
        assert torch.allclose(vlm.projector(x), normed, atol=1e-4)  # same function, raw features in
    assert set(vlm.trainable_state_dict()) >= {"feature_norm.mean", "feature_norm.std", "separator"}


def test_training_fits_feature_norm_once_and_checkpoint_keeps_it(synth_data, tmp_path, tiny_config):
    from phivlm.loading.checkpoint import load_checkpoint
    from phivlm.train.loop import train

    cfg = tiny_config(tmp_path / "s1", synth_data["captions_train"], synth_data["images"], tmp_path / "feat",
                      max_steps=2)
    ckpt = train(cfg)
    vlm = load_checkpoint(ckpt).vlm
    mean, std = vlm.feature_norm.mean.clone(), vlm.feature_norm.std.clone()
    assert mean.abs().sum() > 0 and not torch.allclose(std, torch.ones_like(std))
    cfg2 = tiny_config(tmp_path / "s2", synth_data["instruct_train"], synth_data["images"], tmp_path / "feat",
                       max_steps=2)
    cfg2.data.template, cfg2.data.limit = "auto", 8  # other images: the stage-1 statistics must stay
    again = load_checkpoint(train(cfg2, init=ckpt)).vlm
    assert torch.equal(again.feature_norm.mean, mean) and torch.equal(again.feature_norm.std, std)


def test_lm_attention_kernel_follows_the_compute_device():
    """Eager attention where the model computes on the CPU (faster training there), SDPA where it computes on a GPU,
    also when it is built on the CPU first (FSDP)."""
    from phivlm.config import stage_defaults
    from phivlm.loading.checkpoint import build_vlm

    cfg = stage_defaults("pretrain")
    cfg.model.vision, cfg.model.lm = "tiny-clip", "tiny-llama"
    cpu = torch.device("cpu")
    vlm, _ = build_vlm(cfg, 32, 4, cpu)
    assert vlm.base_lm.config._attn_implementation == "eager"
    vlm, _ = build_vlm(cfg, 32, 4, cpu, computes_on=torch.device("cuda"))
    assert vlm.base_lm.config._attn_implementation == "sdpa"
