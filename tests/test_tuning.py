"""Stage 2 LM tuning modes (frozen, LoRA, QLoRA, full): exactly the intended parameters train.

Each mode trains 3 steps of tiny-clip + tiny-phi from a stage-1 checkpoint through
``phivlm.train.loop.train``; the in-memory model is captured at save time (conftest ``train_run``)
and compared with the original LM, the stage-1 checkpoint and the checkpoint loaded back.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phivlm.cli import main
from phivlm.config import RunConfig, TuningConfig
from phivlm.generate import GenerationConfig
from phivlm.infer import Assistant
from phivlm.models import builtin
from phivlm.models.lm import load_lm
from phivlm.models.vision import VisionTower
from phivlm.loading.checkpoint import PROJECTOR_FILE, load_checkpoint
from phivlm.loading.tuning import apply_tuning, quantization_config
from phivlm.train.checkpoint import merge_checkpoint


MODES = ("frozen", "lora", "qlora", "full")
PHI_TARGETS = {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _stage2_config(tiny_config, synth_data, out: Path, features: Path, mode: str):
    cfg = tiny_config(out, synth_data["instruct_train"], synth_data["images"], features,
                      lr=1e-2, lm_lr=1e-3, max_steps=3)
    cfg.data.template = "auto"  # tiny-phi has no chat template -> the Phi-2 template
    cfg.tuning.lm_tuning = mode
    return cfg


@pytest.fixture(scope="module")
def runs(synth_data, stage1_phi, train_run, tiny_config, tmp_path_factory):
    """mode -> TrainedRun, plus the built-in tower files' digests before and after all trainings."""
    root = tmp_path_factory.mktemp("tuning")
    tower_dir = Path(builtin.resolve("tiny-clip"))
    before = _tree_digest(tower_dir)
    out = {mode: train_run(_stage2_config(tiny_config, synth_data, root / mode, root / "features", mode),
                           init=stage1_phi.ckpt) for mode in MODES}
    out["tower_files"] = (before, _tree_digest(tower_dir))
    return out


@pytest.fixture(scope="module")
def original_lm():
    return dict(load_lm("tiny-phi").named_parameters())


def _base_name(name: str) -> str:
    """A PEFT-wrapped parameter name -> the plain model's name."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _lora_modules(lm) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in lm.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}


@pytest.mark.parametrize("mode", MODES)
def test_vision_tower_is_untouched(runs, mode):
    run = runs[mode]
    assert run.towers, "train() built no VisionTower"
    fresh = VisionTower("tiny-clip").state_dict()
    for tower in run.towers:
        assert not any(p.requires_grad for p in tower.parameters())
        sd = tower.state_dict()
        assert sd.keys() == fresh.keys()
        assert all(torch.equal(sd[k], fresh[k]) for k in sd)
    before, after = runs["tower_files"]
    assert before == after  # the materialised tiny-clip files on disk
    saved = load_file(run.ckpt / PROJECTOR_FILE)
    assert all(k == "separator" or k.startswith(("projector.", "feature_norm.")) for k in saved)


@pytest.mark.parametrize("mode", MODES)
def test_projector_and_separator_train(runs, stage1_phi, mode):
    stage1 = load_file(stage1_phi.ckpt / PROJECTOR_FILE)
    stage2 = load_file(runs[mode].ckpt / PROJECTOR_FILE)
    assert stage1.keys() == stage2.keys() and "separator" in stage1
    stats = [k for k in stage1 if k.startswith("feature_norm.")]  # fixed at stage 1, never trained
    assert stats and all(torch.equal(stage1[k], stage2[k]) for k in stats)
    unchanged = [k for k in stage1 if k not in stats and torch.equal(stage1[k], stage2[k])]
    assert not unchanged, f"{mode}: not trained: {unchanged}"
    # the checkpoint holds exactly the in-memory weights
    mem = runs[mode].vlm.trainable_state_dict()
    assert all(torch.equal(mem[k].float(), stage2[k]) for k in stage2)


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_base_lm_weights_unchanged(runs, original_lm, mode):
    vlm = runs[mode].vlm
    base = {_base_name(n): p for n, p in vlm.lm.named_parameters() if "lora_" not in n}
    assert base.keys() == original_lm.keys()
    assert not any(p.requires_grad for p in base.values())
    changed = [n for n in base if not torch.equal(base[n], original_lm[n])]
    assert not changed, changed
    loaded = load_checkpoint(runs[mode].ckpt).vlm.lm  # and as loaded back from the checkpoint
    reloaded = {_base_name(n): p for n, p in loaded.named_parameters() if "lora_" not in n}
    assert all(torch.equal(reloaded[n], original_lm[n]) for n in original_lm)


def test_frozen_checkpoint_has_no_lm_weights(runs):
    ckpt = runs["frozen"].ckpt
    assert not (ckpt / "adapter").exists() and not (ckpt / "lm").exists()
    assert not any(p.requires_grad for p in runs["frozen"].vlm.lm.parameters())


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapters_train_on_default_phi_targets(runs, mode):
    run = runs[mode]
    modules = _lora_modules(run.vlm.lm)
    assert {n.rsplit(".", 1)[-1] for n in modules} == PHI_TARGETS
    assert len(modules) == len(PHI_TARGETS) * run.vlm.base_lm.config.num_hidden_layers
    for name, m in modules.items():
        assert m.lora_B["default"].weight.abs().sum() > 0, f"{name}: LoRA B still zero"
    trainable = {n for n, p in run.vlm.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # the adapter file holds only the adapters, equal to the in-memory ones
    saved = load_file(run.ckpt / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    mem = {n: p for n, p in run.vlm.lm.named_parameters() if "lora_" in n}
    assert len(saved) == len(mem)
    for k, v in saved.items():
        match = [p for n, p in mem.items() if n.replace(".default", "") == k]
        assert len(match) == 1 and torch.equal(match[0].detach(), v), k
    assert not (run.ckpt / "lm").exists()


def test_qlora_base_is_nf4_and_unchanged(runs, original_lm):
    import bitsandbytes as bnb

    run = runs["qlora"]
    quantised = {n: m for n, m in run.vlm.lm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {n.rsplit(".", 2)[-2] for n in quantised} == PHI_TARGETS  # "...q_proj.base_layer"
    fresh_lm = load_lm("tiny-phi", quantization_config=quantization_config(TuningConfig(lm_tuning="qlora")),
                       device_map={"": "cpu"})
    fresh = dict(fresh_lm.named_modules())
    for name, m in quantised.items():
        assert m.weight.quant_state.quant_type == "nf4" and m.compute_dtype == torch.bfloat16
        assert m.support_avx512bf16_for_cpu is False  # see DESIGN.md: CPU repacking breaks training
        ref = fresh[_base_name(name).removesuffix(".base_layer")]
        assert torch.equal(m.weight.data, ref.weight.data), name  # packed 4-bit storage
        deq = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        assert torch.equal(deq, bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state))
        orig = original_lm[_base_name(name).removesuffix(".base_layer") + ".weight"]
        assert (deq.float() - orig).abs().max() < 0.25 * orig.abs().max(), name  # NF4 of the original
    others = {_base_name(n): p for n, p in run.vlm.lm.named_parameters()
              if "lora_" not in n and p.dtype != torch.uint8}
    assert others and all(torch.equal(p, original_lm[n]) for n, p in others.items())


def test_qlora_trains_after_an_eval_forward(runs, synth_data):
    """An eval-mode no-grad forward must not break later training (the CPU repacking pitfall)."""
    from phivlm.data.dataset import Collator, VLMDataset
    from phivlm.data.features import FeatureStore, cache_dir
    from phivlm.data.sources import load_samples
    from phivlm.data.templates import get_template

    run = runs["qlora"]
    loaded = load_checkpoint(run.ckpt, trainable=True)
    cfg = loaded.cfg
    store = FeatureStore(cache_dir(cfg.data.features, loaded.tower, cfg.data.images))
    samples = load_samples(synth_data["instruct_train"])[:2]
    ds = VLMDataset(samples, get_template(cfg.data.template), loaded.tok, loaded.tower.num_patches, 256)
    batch = Collator(store, loaded.tok.pad_token_id)([ds[0], ds[1]])
    vlm = loaded.vlm
    vlm.eval()
    with torch.no_grad():
        vlm(**batch)
    vlm.train()
    vlm(**batch).backward()
    grads = [m.lora_B["default"].weight.grad for m in _lora_modules(vlm.lm).values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_full_tuning_changes_lm_weights(runs, original_lm):
    run = runs["full"]
    lm = dict(run.vlm.lm.named_parameters())
    assert lm.keys() == original_lm.keys() and all(p.requires_grad for p in lm.values())
    unchanged = [n for n in lm if torch.equal(lm[n], original_lm[n])]
    assert not unchanged, unchanged
    saved = dict(load_lm(str(run.ckpt / "lm")).named_parameters())  # the checkpoint's own LM
    assert all(torch.equal(saved[n], lm[n]) for n in lm)
    assert not (run.ckpt / "adapter").exists()


def test_default_lora_targets_llama():
    lm = apply_tuning(load_lm("tiny-llama"), TuningConfig(lm_tuning="lora"))
    names = _lora_modules(lm)
    assert {n.rsplit(".", 1)[-1] for n in names} == LLAMA_TARGETS
    assert len(names) == len(LLAMA_TARGETS) * lm.config.num_hidden_layers
    custom = apply_tuning(load_lm("tiny-llama"), TuningConfig(lm_tuning="lora", lora_targets="q_proj, v_proj"))
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(custom)} == {"q_proj", "v_proj"}


# -- merging ---------------------------------------------------------------------------------------

QUESTIONS = ("What color is the circle?", "How many shapes are there?")


def _answers(checkpoint: Path, image_dir: str, names: list[str]) -> tuple[list[str], list[str], torch.Tensor]:
    """Greedy answers (often empty: the barely trained random LM likes EOS); 12 tokens sampled with a fixed
    seed, EOS not stopping (never empty, equal only if the distributions are); first-token logits."""
    from phivlm.data.templates import encode_prompt
    from phivlm.infer import load_image

    a = Assistant(checkpoint, "cpu")
    assert a.precision == "fp32"
    images = [load_image(Path(image_dir) / n) for n in names]
    convs = [[("user", a.first_turn(q))] for q in QUESTIONS]
    gen = GenerationConfig(max_new_tokens=12)
    answers = a.answer(images, convs, gen)
    a.eos_ids = {-1}  # no token stops generation
    forced = a.answer(images, convs, GenerationConfig(max_new_tokens=12, temperature=1.0), seed=0)
    ids = torch.tensor([encode_prompt(a.template, a.tok, convs[0], a.loaded.tower.num_patches)])
    with torch.no_grad():
        logits, _ = a.loaded.vlm.prefill(ids, torch.ones_like(ids), a.features(images[:1]))
    return answers, forced, logits


def _assert_same_answers(merged: Path, unmerged: Path, synth_data) -> None:
    names = _val_images(synth_data)
    ans_m, forced_m, logits_m = _answers(merged, synth_data["images"], names)
    ans_u, forced_u, logits_u = _answers(unmerged, synth_data["images"], names)
    assert all(forced_u), forced_u
    assert ans_m == ans_u and forced_m == forced_u
    torch.testing.assert_close(logits_m, logits_u, rtol=0, atol=1e-4)


def _val_images(synth_data, k: int = 2) -> list[str]:
    return sorted({json.loads(line)["image"] for line in Path(synth_data["qa_val"]).read_text().splitlines()})[:k]


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_merge_adds_the_adapters_to_the_base_weights(runs, original_lm, tmp_path, mode):
    run = runs[mode]
    merged = merge_checkpoint(run.ckpt, tmp_path / "merged")
    assert RunConfig.load(merged / "config.yaml").tuning.lm_tuning == "full" and not (merged / "adapter").exists()
    weights = dict(load_lm(str(merged / "lm")).named_parameters())
    scale = run.vlm.lm.peft_config["default"].lora_alpha / run.vlm.lm.peft_config["default"].r
    for name, m in _lora_modules(run.vlm.lm).items():
        key = _base_name(name) + ".weight"
        delta = scale * m.lora_B["default"].weight @ m.lora_A["default"].weight
        torch.testing.assert_close(weights[key], original_lm[key] + delta.detach(), rtol=0, atol=1e-5)
    projector, merged_projector = load_file(run.ckpt / PROJECTOR_FILE), load_file(merged / PROJECTOR_FILE)
    assert projector.keys() == merged_projector.keys()
    assert all(torch.equal(v, merged_projector[k]) for k, v in projector.items())


def test_cli_merge_answers_like_unmerged(runs, synth_data, tmp_path):
    ckpt = runs["lora"].ckpt
    assert main(["merge", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    _assert_same_answers(tmp_path / "merged", ckpt, synth_data)


def test_finetune_merge_flag(stage1_phi, synth_data, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(stage1_phi.ckpt), "--data", synth_data["instruct_train"],
            "--images", synth_data["images"], "--features", str(tmp_path / "features"), "--output", str(out),
            "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--lm-lr", "1e-3", "--precision", "fp32",
            "--device", "cpu", "--lm-tuning", "lora", "--merge"]
    assert main(argv) == 0
    assert (out / "checkpoint" / "adapter").is_dir() and (out / "merged" / "lm").is_dir()
    _assert_same_answers(out / "merged", out / "checkpoint", synth_data)


def test_train_leaves_the_callers_config_as_given(runs, synth_data, tiny_config, tmp_path):
    """train() resolves the template ("auto") and, from a fully tuned checkpoint, the LM on its own copy."""
    from phivlm.train.loop import train

    init = runs["full"].ckpt
    cfg = _stage2_config(tiny_config, synth_data, tmp_path / "run", tmp_path / "features", "full")
    cfg.train.max_steps, cfg.data.limit = 1, 8
    before = copy.deepcopy(cfg)
    ckpt = train(cfg, init=init)
    assert cfg == before
    saved = RunConfig.load(ckpt / "config.yaml")  # what the run itself used
    assert (saved.data.template, saved.model.lm) == ("phi", str(init / "lm"))
