"""The model card (README.md) of an exported model."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .. import __version__
from ..config import RunConfig
from ..models import builtin
from ..errors import PhivlmError

PROJECTORS = {
    "linear": "Linear(d_vision -> d_lm)",
    "mlp2x_gelu": "Linear -> GELU -> Linear (LLaVA-1.5)",
    "residual": "Linear(d_vision -> d_lm), then {depth} blocks of x + Linear(GELU(Linear(LN(x))))",
}
FORMATS = {
    "llava": "`LlavaForConditionalGeneration` + `LlavaProcessor` (plain `transformers`; the layout vLLM and "
             "SGLang serve)",
    "phivlm": "`PhivlmForConditionalGeneration` + `LlavaProcessor`: needs `pip install phivlm` and "
              "`import phivlm` (which registers the model type; no `trust_remote_code`)",
}
TOWER_KINDS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP", "dinov2": "DINOv2",
               "dinov2_with_registers": "DINOv2 with registers"}
VLLM_TOWERS = ("; `transformers` loads it, vLLM does not: its Llava takes CLIP, SigLIP and Pixtral vision "
               "towers only")
LLAVA_PROJECTOR = {
    "linear": "stored as Llava's `linear_1`, identity activation (`linear`) and an identity `linear_2`: exact",
    "mlp2x_gelu": "stored as Llava's `linear_1`, `gelu`, `linear_2`: the same module",
}


def find_metrics(ckpt: Path, explicit: str | Path | None = None) -> tuple[Path, dict] | None:
    """``phivlm eval``'s ``metrics.json``: ``explicit``, else one in the checkpoint or run folder, or in an
    ``eval`` folder beside them whose ``checkpoint`` entry names this checkpoint."""
    from ..loading.checkpoint import resolve_checkpoint

    def read(path: Path) -> dict | None:
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return d if isinstance(d, dict) else None

    def names_ckpt(d: dict) -> bool:
        try:
            return resolve_checkpoint(d.get("checkpoint", "")).resolve() == ckpt.resolve()
        except PhivlmError:
            return False

    if explicit is not None:
        d = read(Path(explicit))
        if d is None:
            raise PhivlmError(f"{explicit}: cannot read metrics (expected phivlm eval's metrics.json)")
        return Path(explicit), d
    for folder, own in ((ckpt, True), (ckpt.parent, True), (ckpt.parent / "eval", False),
                        (ckpt.parent.parent / "eval", False)):
        path = folder / "metrics.json"
        if path.is_file() and (d := read(path)) is not None and (own or names_ckpt(d)):
            return path, d
    return None


def _flatten(d, prefix: str = "") -> list[tuple[str, object]]:
    if not isinstance(d, dict):
        return [(prefix, d)] if isinstance(d, (int, float)) and not isinstance(d, bool) else []
    return [row for k, v in d.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metrics_tables(metrics: dict) -> list[str]:
    """``phivlm eval`` metrics: one table per task, a column per condition (image, baselines); any other
    JSON: its numbers."""
    if not isinstance(metrics.get("tasks"), dict):
        return ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in _flatten(metrics)]
    out: list[str] = []
    for task, entry in metrics["tasks"].items():
        scores = entry.get("scores", {}) if isinstance(entry, dict) else {}
        conditions = [c for c in scores if isinstance(scores[c], dict)]
        if not conditions:
            continue
        cols = {c: dict(_flatten(scores[c])) for c in conditions}
        out += [f"**{task}** ({entry.get('n', '?')} items, `{entry.get('source', '')}`)", "",
                "| metric | " + " | ".join(conditions) + " |", "|---" * (len(conditions) + 1) + "|"]
        out += [f"| {k} | " + " | ".join(_fmt(cols[c].get(k, "")) for c in conditions) + " |"
                for k in cols[conditions[0]]]
        out.append("")
    return out


def _is_hub_id(name: str) -> bool:
    return name not in builtin.BUILTIN and "/" in name and not Path(name).exists()


def _vllm_tower(parts) -> bool:
    return parts.vision.config.model_type in ("clip_vision_model", "siglip_vision_model")


def vision_text(name: str, feature_layer: int, parts) -> str:
    """The vision tower's row of the model table: its type, hidden layer, dropped tokens, token grid, image size."""
    vcfg = parts.vision.config
    kind = TOWER_KINDS.get(vcfg.model_type, vcfg.model_type)
    if parts.prefix == 0:
        dropped = "every token kept (no CLS token)"
    elif parts.prefix == 1:
        dropped = "CLS token dropped"
    else:
        dropped = f"CLS and {parts.prefix - 1} register tokens dropped"
    g, s, n, t = parts.grid, parts.pooled_side, parts.num_image_tokens, parts.tiles
    side = s if parts.pooled else g
    grid = f"{side}x{side} = {n} image tokens" if t == 1 else f"{side}x{side} image tokens per tile"
    grid += f", average-pooled from the {g}x{g} patch grid" if parts.pooled else " (one per patch)"
    seen = parts.image_size // t
    size = f"{parts.image_size} px" if t == 1 else \
        f"{parts.image_size} px cut into {t}x{t} tiles of {seen} px, each encoded alone ({n} image tokens in all)"
    if seen != vcfg.image_size:
        size += f" (position embeddings interpolated from the model's {vcfg.image_size} px)"
    return (f"`{name}` ({kind}, {vcfg.patch_size}-px patches, frozen): hidden states of layer {feature_layer}, "
            f"{dropped}: {grid} at {size}")


def model_card(cfg: RunConfig, fmt: str, source: Path, lm_tuning: str, prompt_example: str,
               metrics: tuple[Path, dict] | None, parts) -> str:
    """Markdown with YAML front matter. ``lm_tuning``: the run's own mode (before merging); ``parts``: the
    exported model taken apart (``formats.Parts``: vision model and how its features are read)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    random_vision = builtin.is_random_vision(m.vision)
    front = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
             "tags": ["phivlm", "llava" if fmt == "llava" else "phivlm-residual", "vision-language"]}
    if hub := [n for n in (m.lm, m.vision) if _is_hub_id(n)]:
        front["base_model"] = hub
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
           f"# {Path(m.lm).name} + {Path(m.vision).name} vision-language model (phivlm)", "",
           f"A LLaVA-style vision-language model trained with phivlm {__version__} and exported from "
           f"`{source}` by `phivlm export`.", ""]
    if random_vision:
        out += [f"> **Warning:** {builtin.RANDOM_VISION_WARNING.format(name=m.vision)}.", ""]
    if m.vision == "dinov2-small":
        from ..models.dinov2_onnx import ORIGIN

        out += [f"Vision weights (built-in `dinov2-small`): {ORIGIN}.", ""]
    projector = PROJECTORS.get(m.projector, m.projector).format(depth=m.projector_depth)
    if fmt == "llava":
        projector += f"; {LLAVA_PROJECTOR[m.projector]}"
    if m.slot_embedding:
        projector += "; then a learned vector per image-token slot, scaled by the token's RMS (`SlotEmbedding`)"
    out += ["## Model", "",
            "| part | |", "|---|---|",
            f"| vision tower | {vision_text(m.vision, m.feature_layer, parts)} |",
            f"| projector | `{m.projector}`: {projector} |",
            f"| language model | `{m.lm}` |",
            "| image separator | one learned embedding right after the image tokens: the `<image_sep>` token |",
            f"| format | {FORMATS[fmt]}{VLLM_TOWERS if fmt == 'llava' and not _vllm_tower(parts) else ''} |", ""]
    stage1 = lm_tuning == "frozen" and d.template == "plain"
    merged = ", merged into the weights" if lm_tuning in ("lora", "qlora") else ""
    trained = "projector and separator (LM frozen)" if lm_tuning == "frozen" else \
        f"projector, separator and LM (`{lm_tuning}`{merged})"
    stage = ("stage 1, alignment: the projector and separator learn on image captions, LM frozen" if stage1 else
             f"stage 2, instruction finetuning of the {trained} on conversations, starting from a stage-1 "
             "checkpoint (whose run config is not stored here)")
    objective = getattr(t, "objective", "standard")
    if objective == "standard":
        objective_text = "`standard`: one teacher-forced causal pass"
    else:
        ar = (f"token by token with a KV cache, teacher forcing {t.tf_schedule} from {t.tf_start:g} to "
              f"{t.tf_end:g}, otherwise feeding back the model's {t.feedback} token")
        objective_text = (f"`mixed`: {t.mixed_standard_fraction:g} of the steps standard, the others "
                          f"autoregressive ({ar})" if objective == "mixed" else f"`{objective}`: {ar}")
    data = (f"`{d.data}` (images `{d.images}`{f', {d.limit} images' if d.limit else ''})"
            f"{f'; validation `{d.val_data}`' if d.val_data else ''}" if d.data else "not recorded")
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epoch{'s' if t.epochs != 1 else ''}"
    out += ["## Training", "",
            f"- Stage of this checkpoint: {stage}.",
            f"- Data: {data}.",
            f"- Prompt template: `{d.template}`; at most {d.max_length} text tokens per sample.",
            f"- Objective: {objective_text}; loss on the answers (captions) and their closing EOS only.",
            f"- Optimisation: {length}, batch {t.batch_size}, lr {t.lr:g} (LM {t.lm_lr:g}), {t.precision}, "
            f"seed {t.seed}.",
            "", "<details><summary>Full run config</summary>", "", "```yaml",
            yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", "</details>", ""]
    out += ["## Evaluation", ""]
    if metrics:
        path, values = metrics
        out += [f"From `{path}` (`phivlm eval`; baselines such as shuffled or blank images show how much the "
                "answers depend on the image):", ""] + metrics_tables(values)
    else:
        out += ["No `phivlm eval` metrics (`metrics.json`) were found for this checkpoint."]
    out += ["", "## Usage", "", "```python"]
    if fmt == "llava":
        out += ["from transformers import AutoProcessor, LlavaForConditionalGeneration",
                "", "model = LlavaForConditionalGeneration.from_pretrained(path)"]
    else:
        out += ["import phivlm  # registers the 'phivlm' model type with transformers",
                "from transformers import AutoModelForImageTextToText, AutoProcessor",
                "", "model = AutoModelForImageTextToText.from_pretrained(path)"]
    out += ["processor = AutoProcessor.from_pretrained(path)",
            'messages = [{"role": "user", "content": [{"type": "image", "path": "photo.jpg"},',
            '                                         {"type": "text", "text": "What is in the image?"}]}]',
            "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
            '                                       return_dict=True, return_tensors="pt")',
            "out = model.generate(**inputs, max_new_tokens=64)",
            'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```", "",
            "`pipeline(\"image-text-to-text\", model=path)` works as well, and so do `phivlm chat`, `serve` and "
            "`eval` with `--checkpoint path`.", "",
            "## Prompt format", "",
            "The processor's chat template renders prompts exactly as phivlm did in training. A prompt written "
            "by hand must put `<image><image_sep>` where the image goes (the processor expands `<image>` to "
            f"{parts.num_image_tokens} tokens); for example:", "", "```", prompt_example, "```", "",
            "## Exactness", "",
            "`phivlm export` checks that the processor reproduces phivlm's prompt tokens. phivlm's tests check "
            "that an export, loaded by `transformers` in a fresh process, gives phivlm's logits (within 1e-4, "
            "fp32) and its greedy answers. The `<image>` and `<image_sep>` tokens are never generated: "
            "`generation_config.json` suppresses them. Preprocessing equals phivlm's with the PIL image "
            "processor backend (the default without torchvision); the torchvision backend resizes slightly "
            "differently.", ""]
    return "\n".join(out)
