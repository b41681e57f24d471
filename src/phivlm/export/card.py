"""The model card (README.md) of an exported model."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .. import __version__
from ..config import RunConfig
from ..models import builtin

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
LLAVA_PROJECTOR = {
    "linear": "stored as Llava's `linear_1`, identity activation (`linear`) and an identity `linear_2`: exact",
    "mlp2x_gelu": "stored as Llava's `linear_1`, `gelu`, `linear_2`: the same module",
}


def find_metrics(ckpt: Path) -> tuple[Path, dict] | None:
    """``metrics.json`` (written by ``phivlm eval``) in the checkpoint folder or its run folder."""
    for folder in (ckpt, ckpt.parent):
        path = folder / "metrics.json"
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def _flatten(d, prefix: str = "") -> list[tuple[str, object]]:
    if not isinstance(d, dict):
        return [(prefix, d)]
    return [row for k, v in d.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else f"`{json.dumps(v)}`" if isinstance(v, (list, dict)) else str(v)


def _is_hub_id(name: str) -> bool:
    return name not in builtin.BUILTIN and "/" in name and not Path(name).exists()


def model_card(cfg: RunConfig, fmt: str, source: Path, lm_tuning: str, prompt_example: str) -> str:
    """Markdown with YAML front matter. ``lm_tuning``: the run's own mode (before merging)."""
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
    projector = PROJECTORS.get(m.projector, m.projector).format(depth=m.projector_depth)
    if fmt == "llava":
        projector += f"; {LLAVA_PROJECTOR[m.projector]}"
    out += ["## Model", "",
            "| part | |", "|---|---|",
            f"| vision tower | `{m.vision}` (CLIP, frozen): hidden states of layer {m.feature_layer}, CLS token "
            "dropped: 49 image tokens at 224 px |",
            f"| projector | `{m.projector}`: {projector} |",
            f"| language model | `{m.lm}` |",
            "| image separator | one learned embedding right after the image tokens: the `<image_sep>` token |",
            f"| format | {FORMATS[fmt]} |", ""]
    stage1 = lm_tuning == "frozen" and d.template == "plain"
    stage = ("stage 1, alignment: the projector and separator learn on image captions, LM frozen" if stage1 else
             f"stage 2, instruction finetuning: projector, separator and LM (`{lm_tuning}`"
             f"{', merged into the weights' if lm_tuning in ('lora', 'qlora') else ''}) on conversations, "
             "starting from a stage-1 checkpoint (whose run config is not stored here)")
    objective = getattr(t, "objective", "standard")
    out += ["## Training", "",
            f"- Stage of this checkpoint: {stage}.",
            f"- Data: `{d.data}` (images `{d.images}`{f', {d.limit} images' if d.limit else ''})"
            f"{f'; validation `{d.val_data}`' if d.val_data else ''}.",
            f"- Prompt template: `{d.template}`; at most {d.max_length} text tokens per sample.",
            f"- Objective: `{objective}`; loss on the answers (captions) and their closing EOS only.",
            f"- Optimisation: {f'{t.max_steps} steps' if t.max_steps else f'{t.epochs:g} epochs'}, batch "
            f"{t.batch_size}, lr {t.lr:g} (LM {t.lm_lr:g}), {t.precision}, seed {t.seed}.",
            "", "<details><summary>Full run config</summary>", "", "```yaml",
            yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", "</details>", ""]
    out += ["## Evaluation", ""]
    found = find_metrics(source)
    if found:
        path, metrics = found
        out += [f"From `{path}` (`phivlm eval`):", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(metrics)]
    else:
        out += ["No `phivlm eval` metrics (`metrics.json`) were found next to the checkpoint."]
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
            "by hand must put `<image><image_sep>` where the image goes (the processor expands `<image>` to 49 "
            "tokens); for example:", "", "```", prompt_example, "```", "",
            "## Exactness", "",
            "`phivlm export` checks that the processor reproduces phivlm's prompt tokens. phivlm's tests check "
            "that an export, loaded by `transformers` in a fresh process, gives phivlm's logits (within 1e-4, "
            "fp32) and its greedy answers. The `<image>` and `<image_sep>` tokens are never generated: "
            "`generation_config.json` suppresses them. Preprocessing equals phivlm's with the PIL image "
            "processor backend (the default without torchvision); the torchvision backend resizes slightly "
            "differently.", ""]
    return "\n".join(out)
