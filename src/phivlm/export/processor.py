"""The exported processor: the tower's image processor + the LM tokenizer with ``<image>`` and ``<image_sep>``
added, and a chat template that renders prompts exactly as phivlm's template does.

phivlm's input is ``[N image embeddings][separator][text]``; in the export the separator is a real token,
``<image_sep>``, written right after ``<image>`` (which the processor expands to N ``<image>`` tokens: 49 for
CLIP ViT-B/32 at 224 px; ``token_layout`` gives the counting settings for every tower and token grid).
"""
from __future__ import annotations

from PIL import Image

from ..data.templates import IMAGE_TOKEN, PHI_SYSTEM, encode_prompt, get_template, start_token, tile_markers
from ..models.vlm import IMAGE_ID, SEP_ID
from ..errors import PhivlmError
from ..registry import Registry

SEP_TOKEN = "<image_sep>"
IMAGE_SLOT = IMAGE_TOKEN + SEP_TOKEN  # what a chat template writes where the image goes

# Message content -> text with "<image>" where the image goes: a string as is; a list of
# {"type": "image"} / {"type": "text", "text": ...} items joined with "\n" (phivlm writes "<image>\n{question}").
_CONTENT = (
    "{%- macro phivlm_text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' }}{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
_ROLES = ("{%- if m['role'] not in ['user', 'assistant'] -%}"
          "{{ raise_exception('phivlm templates know only user and assistant turns') }}{%- endif -%}")

CHAT_TEMPLATES: Registry = Registry("export chat template")


@CHAT_TEMPLATES.register("plain")
def _plain(tok) -> str:
    """phivlm ``plain``: the start token and the image, then each question (image removed, stripped) + "\\n",
    answer + EOS."""
    start = tok.convert_ids_to_tokens(start_token(tok))
    return _CONTENT + "{{- '" + start + IMAGE_SLOT + "' -}}{%- for m in messages -%}" + _ROLES + (
        "{%- if m['role'] == 'user' -%}"
        "{%- set q = phivlm_text(m['content']) | replace('<image>', '') | trim -%}"
        "{%- if q -%}{{ q + '\\n' }}{%- endif -%}"
        "{%- else -%}{{ phivlm_text(m['content']) + eos_token }}{%- endif -%}"
        "{%- endfor -%}")


@CHAT_TEMPLATES.register("phi")
def _phi(tok) -> str:
    """phivlm ``phi``: the Phi-2 chat template of LLaVA-Phi / TinyLLaVA / Bunny."""
    return _CONTENT + "{%- for m in messages -%}" + _ROLES + (
        "{%- if m['role'] == 'user' -%}"
        "{{ ('" + PHI_SYSTEM.replace("'", "\\'") + " ' if loop.first else '') + 'USER: ' + "
        "(phivlm_text(m['content']) | replace('<image>', '" + IMAGE_SLOT + "')) + ' ASSISTANT:' }}"
        "{%- else -%}{{ ' ' + phivlm_text(m['content']) + eos_token }}{%- endif -%}"
        "{%- endfor -%}")


@CHAT_TEMPLATES.register("chat")
def _chat(tok) -> str:
    """phivlm ``chat``: the LM tokenizer's own template, run on messages with string content."""
    return _CONTENT + (
        "{%- set phivlm_ns = namespace(messages=[]) -%}{%- for m in messages -%}"
        "{%- set phivlm_ns.messages = phivlm_ns.messages + [{'role': m['role'], 'content': "
        "phivlm_text(m['content']) | replace('<image>', '" + IMAGE_SLOT + "')}] -%}"
        "{%- endfor -%}{%- set messages = phivlm_ns.messages -%}") + tok.chat_template


def add_image_tokens(tok) -> tuple[int, int]:
    """Add ``<image>`` and ``<image_sep>`` as special tokens; returns their ids."""
    vocab = tok.get_vocab()
    for t in (IMAGE_TOKEN, SEP_TOKEN):
        if t in vocab:
            raise PhivlmError(f"the LM tokenizer already has a token {t!r}; cannot add phivlm's image tokens")
    tok.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN, SEP_TOKEN]}, replace_extra_special_tokens=False)
    img, sep = tok.convert_tokens_to_ids([IMAGE_TOKEN, SEP_TOKEN])
    return img, sep


def token_layout(parts) -> dict:
    """``LlavaProcessor`` settings that expand ``<image>`` to exactly the model's ``num_image_tokens``.

    The processor counts ``(H // patch_size) * (W // patch_size) + num_additional_image_tokens``, minus 1 with
    ``vision_feature_select_strategy="default"``. Unpooled, that is the vision model's own patch grid: a CLS
    that the model drops is Llava's ``default`` (+1 -1), no prefix (SigLIP) Llava's ``full`` (+0); a longer
    prefix (CLS + registers, phivlm format only) is dropped whole, so ``full`` counts the patches kept. A pooled
    grid counts cells of ``image_size // side`` pixels (``full``), corrected where that division is inexact."""
    if not parts.pooled:
        if parts.prefix == 1:
            layout = {"patch_size": parts.vision.config.patch_size, "vision_feature_select_strategy": "default",
                      "num_additional_image_tokens": 1}
        else:
            layout = {"patch_size": parts.vision.config.patch_size, "vision_feature_select_strategy": "full",
                      "num_additional_image_tokens": 0}
    else:
        cell = parts.image_size // parts.pooled_side
        layout = {"patch_size": cell, "vision_feature_select_strategy": "full",
                  "num_additional_image_tokens": parts.pooled_side ** 2 - (parts.image_size // cell) ** 2}
    n = (parts.image_size // layout["patch_size"]) ** 2 + layout["num_additional_image_tokens"] - \
        (layout["vision_feature_select_strategy"] == "default")
    if n != parts.num_image_tokens:
        raise PhivlmError(f"the processor would expand <image> to {n} tokens, the model yields "
                          f"{parts.num_image_tokens}")
    return layout


def build_processor(tok, image_processor, template: str, parts):
    """The processor (``tok`` must already hold the image tokens) with phivlm's prompt format: a
    ``LlavaProcessor`` (``token_layout`` counts its image tokens), or for a tiled image a ``PhivlmProcessor``."""
    from transformers import LlavaProcessor

    from ..hf.processing import PhivlmProcessor

    chat_template = CHAT_TEMPLATES.get(template)(tok)
    tok.chat_template = chat_template  # one template whichever object a user asks
    if parts.tiles > 1:
        return PhivlmProcessor(image_processor=image_processor, tokenizer=tok, chat_template=chat_template,
                               image_token=IMAGE_TOKEN, tile_markers=tile_markers(parts.tiles, parts.markers_after),
                               tokens_per_tile=parts.num_image_tokens // parts.tiles ** 2,
                               markers_after=parts.markers_after)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=chat_template,
                          image_token=IMAGE_TOKEN, **token_layout(parts))


def check_prompts(processor, phivlm_tok, template: str, slots: list[int], image_size: int) -> None:
    """Fail unless the processor's chat template + tokenizer give phivlm's prompt token ids."""
    img, sep = processor.tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, SEP_TOKEN])
    image = Image.new("RGB", (image_size, image_size), (127, 127, 127))
    tpl = get_template(template)
    for question in ("What is in the image?", ""):
        if not question and template != "plain":
            continue
        turns = [("user", f"{IMAGE_TOKEN}\n{question}" if question else IMAGE_TOKEN)]
        want = [{IMAGE_ID: img, SEP_ID: sep}.get(i, i) for i in encode_prompt(tpl, phivlm_tok, turns, slots)]
        content = [{"type": "image", "image": image}] + ([{"type": "text", "text": question}] if question else [])
        got = [int(i) for i in processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"][0]]
        if got != want:
            raise PhivlmError(f"the exported processor does not reproduce phivlm's {template!r} prompt: "
                              f"{processor.tokenizer.decode(got)!r}")
