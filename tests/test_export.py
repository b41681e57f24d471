"""``phivlm export``: the exported folder, loaded by ``transformers`` in a fresh process, gives phivlm's
logits (<= 1e-4, fp32) and greedy answers, for every projector; Llava exports load without phivlm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from phivlm.cli import main
from phivlm.config import RunConfig
from phivlm.data.templates import IMAGE_TOKEN, encode_prompt, get_template
from phivlm.export import MARKER, export
from phivlm.generate import GenerationConfig, generate
from phivlm.infer import Assistant
from phivlm.models.vlm import IMAGE_ID, SEP_ID
from phivlm.registry import PhivlmError
from phivlm.train.checkpoint import build_vlm, save_checkpoint

QUESTION = "What color is the shape?"
NEW_TOKENS = 12
# name: (lm, projector, template, lm_tuning, expected format)
CASES = {
    "llama-linear-chat": ("tiny-llama", "linear", "chat", "frozen", "llava"),  # tied embeddings
    "phi-mlp-lora": ("tiny-phi", "mlp2x_gelu", "phi", "lora", "llava"),  # LoRA merged; untied head
    "llama-residual-plain": ("tiny-llama", "residual", "plain", "frozen", "phivlm"),
    "phi-linear-headbias": ("tiny-phi", "linear", "phi", "full", "phivlm"),  # Llava cannot hold the head bias
}

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


def make_checkpoint(out: Path, lm: str, projector: str, template: str, tuning: str, tower) -> Path:
    """A checkpoint with random projector/separator (and LoRA or LM-head bias) weights: nothing is zero."""
    cfg = RunConfig()
    cfg.model.vision, cfg.model.lm, cfg.model.projector = tower.name, lm, projector
    cfg.data.template, cfg.tuning.lm_tuning = template, tuning
    torch.manual_seed(len(out.name))
    vlm, tok = build_vlm(cfg, tower.hidden_size, tower.num_patches, torch.device("cpu"))
    with torch.no_grad():
        for p in vlm.projector.parameters():
            p.normal_(0, 0.3)
        for name, p in vlm.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        if tuning == "full":
            vlm.base_lm.get_output_embeddings().bias.normal_(0, 0.5)
    return save_checkpoint(vlm, cfg, tok, out / "checkpoint")


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
def exported(tmp_path_factory, tiny_tower):
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
    for name, (lm, projector, template, tuning, fmt) in CASES.items():
        ckpt = make_checkpoint(root / name, lm, projector, template, tuning, tiny_tower)
        out = root / f"{name}-hf"
        if name == "phi-mlp-lora":  # through the CLI once
            assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        else:
            export(ckpt, out)
        cases[name] = {"ckpt": ckpt, "dir": out, "format": fmt, "logits": root / f"{name}.pt"}
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
    if c["format"] == "llava":
        assert hf["pipeline"] == ref["answer"]


def test_greedy_answers_are_not_trivial(exported):
    """The comparison means something only if the random models generate, and differently."""
    tokens = [c["ref"]["tokens"] for c in exported[0].values()]
    assert all(len(t) == NEW_TOKENS for t in tokens) and len({tuple(t) for t in tokens}) == len(tokens)


@pytest.mark.parametrize("name", CASES)
def test_assistant_accepts_the_export(exported, name):
    c, image = exported[0][name], exported[1]
    got, ref = reference(Assistant(c["dir"], device="cpu", precision="fp32"), image), c["ref"]
    assert got["ids"] == ref["ids"]
    assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-4
    assert got["tokens"] == ref["tokens"] and got["answer"] == ref["answer"]


@pytest.mark.parametrize("name", ["llama-linear-chat", "phi-mlp-lora", "llama-residual-plain"])
def test_chat_template_renders_multi_turn_like_phivlm(exported, name):
    from transformers import AutoProcessor

    c = exported[0][name]
    proc = AutoProcessor.from_pretrained(c["dir"])
    meta = json.loads((c["dir"] / MARKER).read_text())
    template, tok = get_template(meta["config"]["data"]["template"]), c["assistant"].tok
    turns = [("user", f"{IMAGE_TOKEN}\nWhat is it?"), ("assistant", "a red circle"), ("user", "Where is it?")]
    want = encode_prompt(template, tok, turns, 49)
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


def test_export_refuses_what_it_cannot_do(exported, tmp_path, capsys):
    cases = exported[0]
    with pytest.raises(PhivlmError, match="residual"):
        export(cases["llama-residual-plain"]["ckpt"], tmp_path / "a", fmt="llava")
    assert main(["export", "--checkpoint", str(cases["phi-linear-headbias"]["ckpt"]), "--out", str(tmp_path / "b"),
                 "--format", "llava"]) == 2
    assert "bias" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(PhivlmError, match="refusing"):
        export(cases["llama-linear-chat"]["ckpt"], tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
