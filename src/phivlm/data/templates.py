"""Conversation templates: turn a conversation into token ids with the image slots and labels.

A conversation is a list of ``(role, text)`` pairs, ``role`` in {"user", "assistant"}, alternating,
starting with the user; the first user text holds ``<image>``. Labels cover every assistant answer
and the EOS that closes it, nothing else. Text segments are tokenized one by one, so the prompt a
model sees at inference tokenizes exactly as in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..models.vlm import IGNORE, IMAGE_ID, SEP_ID
from ..registry import PhivlmError, Registry

IMAGE_TOKEN = "<image>"
PHI_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
Turns = list[tuple[str, str]]
Segment = tuple[Union[str, list[int]], bool]  # (text or token ids, labelled)


class TemplateError(PhivlmError):
    """The template and tokenizer do not fit this sample (e.g. nothing would be labelled)."""


class Template:
    name = ""

    def segments(self, turns: Turns, tok, generation: bool) -> list[Segment]:
        """Segments for ``turns``; with ``generation`` the last turn is a user turn to be answered."""
        raise NotImplementedError


TEMPLATES: Registry[type[Template]] = Registry("template")


def _pairs(turns: Turns, generation: bool):
    """Yield (user, answer-or-None) pairs; validates alternation."""
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise TemplateError(f"turn {i + 1} is {role!r}: turns must alternate user/assistant from the user")
    if generation != (len(turns) % 2 == 1):
        raise TemplateError("a prompt must end with a user turn; a training sample with an assistant turn")
    for i in range(0, len(turns), 2):
        yield turns[i][1], (turns[i + 1][1] if i + 1 < len(turns) else None)


def start_token(tok) -> int:
    """The token ``plain`` puts before the image: the tokenizer's BOS, else its EOS.

    An LM routes much of every attention to its first position (an "attention sink"). With an image token
    there, the image is read poorly: a projector into frozen SmolLM2-135M taught to name a one-object image's
    colour reached 35% in 100 steps with the image first, 84-100% behind EOS, ``<|endoftext|>`` or BOS."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


@TEMPLATES.register("plain")
class Plain(Template):
    """Stage 1: the LM's start token, ``<image>``, then the caption and EOS (any question text goes before the
    answer)."""

    name = "plain"

    def segments(self, turns, tok, generation):
        out: list[Segment] = [([start_token(tok)], False), (IMAGE_TOKEN, False)]
        for user, answer in _pairs(turns, generation):
            q = user.replace(IMAGE_TOKEN, "").strip()
            if q:
                out.append((q + "\n", False))
            if answer is not None:
                out += [(answer, True), ([tok.eos_token_id], True)]
        return out


@TEMPLATES.register("phi")
class Phi(Template):
    """The Phi-2 chat template of LLaVA-Phi / TinyLLaVA / Bunny; EOS is the tokenizer's own."""

    name = "phi"

    def segments(self, turns, tok, generation):
        out: list[Segment] = []
        for i, (user, answer) in enumerate(_pairs(turns, generation)):
            prefix = PHI_SYSTEM + " " if i == 0 else ""
            out.append((f"{prefix}USER: {user} ASSISTANT:", False))
            if answer is not None:
                out += [(" " + answer, True), ([tok.eos_token_id], True)]
        return out


@TEMPLATES.register("chat")
class Chat(Template):
    """The tokenizer's own chat template; assistant spans found by rendering growing prefixes."""

    name = "chat"

    def segments(self, turns, tok, generation):
        if not getattr(tok, "chat_template", None):
            raise TemplateError("tokenizer has no chat template; use --template phi or plain")
        msgs = [{"role": r, "content": t} for r, t in turns]
        render = lambda m, gen: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
        out: list[Segment] = []
        done = ""
        for i in range(1, len(msgs) + 1, 2):
            prompt = render(msgs[:i], True)
            if not prompt.startswith(done):
                raise TemplateError("chat template renders a conversation prefix differently; cannot find turns")
            out.append((prompt[len(done):], False))
            done = prompt
            if i == len(msgs):
                break
            full = render(msgs[: i + 1], False)
            answer = msgs[i]["content"]
            span = full[len(done):]
            if not full.startswith(done) or not span.startswith(answer):
                raise TemplateError("chat template does not put the assistant answer right after its prompt")
            rest = span[len(answer):]
            if not rest.startswith(tok.eos_token):
                raise TemplateError(f"chat template does not close assistant turns with EOS {tok.eos_token!r}")
            out += [(answer, True), ([tok.eos_token_id], True), (rest[len(tok.eos_token):], False)]
            done = full
        return out


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turns_kept: int  # user/assistant pairs kept after truncation


# the words that name a tile of a 2x2 or 3x3 grid; larger grids say "row r column c"
_TILE_NAMES = {2: ("top left", "top right", "bottom left", "bottom right"),
               3: ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")}


def tile_markers(tiles: int, after: bool = False) -> list[str]:
    """Each tile's text marker (``--image-tiles``), row-major: where the tile lies, in words, so the LM reads it as
    text it knows and an answer can copy it: " top left:" before the tile's image tokens, or " top left;" after
    them (``--tile-markers after``). Measured on the demo (3x3 tiles): position answers 43-56% right with markers
    before (26% with " r1c1:"-style ones), 100% with markers after. After its tile, a marker can attend to the
    tile and take in what it shows; before it, the tile token itself would have to take in the marker, and
    projected image tokens are too large for the LM's layers to change (see ``SlotEmbedding``)."""
    names = _TILE_NAMES.get(tiles) or [f"row {r + 1} column {c + 1}" for r in range(tiles) for c in range(tiles)]
    return [f" {name};" if after else f" {name}:" for name in names]


def image_slots(tok, n_tokens: int, tiles: int = 1, markers: str = "before") -> list[int]:
    """The ids one ``<image>`` becomes: ``n_tokens`` image slots (``IMAGE_ID``) and the separator (``SEP_ID``);
    with ``tiles`` > 1, each of the tiles x tiles tiles' share of the slots with its marker (``tile_markers``)
    ``markers`` ("before" | "after") them."""
    if tiles <= 1:
        return [IMAGE_ID] * n_tokens + [SEP_ID]
    tile, after = [IMAGE_ID] * (n_tokens // tiles ** 2), markers == "after"
    ids: list[int] = []
    for marker in tile_markers(tiles, after):
        marker_ids = tok(marker, add_special_tokens=False)["input_ids"]
        ids += tile + marker_ids if after else marker_ids + tile
    return ids + [SEP_ID]


def _slots(tok, image: int | list[int]) -> list[int]:
    return image_slots(tok, image) if isinstance(image, int) else image


def tokenize_segments(segments: list[Segment], tok, image: int | list[int]) -> tuple[list[int], list[int]]:
    """``image``: the ids ``<image>`` becomes (``image_slots``), or just the number of image tokens."""
    slots = _slots(tok, image)
    ids: list[int] = []
    labels: list[int] = []
    n_images = 0
    for content, labelled in segments:
        if isinstance(content, str):
            parts = content.split(IMAGE_TOKEN)
            piece: list[int] = []
            for j, part in enumerate(parts):
                if j:
                    piece += slots
                    n_images += 1
                if part:
                    piece += tok(part, add_special_tokens=False)["input_ids"]
        else:
            piece = list(content)
        ids += piece
        labels += piece if labelled else [IGNORE] * len(piece)
    if n_images != 1:
        raise TemplateError(f"conversation has {n_images} {IMAGE_TOKEN} tokens; exactly one is needed")
    return ids, labels


def encode(template: Template, tok, turns: Turns, image: int | list[int], max_length: int = 0) -> Encoded:
    """Tokenize a training conversation; too long -> drop whole later turns (the image is never cut).

    ``max_length`` counts text tokens: what the image becomes (slots, tile markers, separator) comes on top of it.
    """
    slots = _slots(tok, image)
    n_pairs = len(turns) // 2
    limit = max_length + len(slots) if max_length else 0
    for keep in range(n_pairs, 0, -1):
        ids, labels = tokenize_segments(template.segments(turns[: 2 * keep], tok, False), tok, slots)
        if not limit or len(ids) <= limit or keep == 1:
            break
    if limit and len(ids) > limit:  # one turn alone is too long: cut its answer's tail
        ids, labels = ids[:limit], labels[:limit]
    if all(x == IGNORE for x in labels[1:]):
        raise TemplateError(f"no labelled token after tokenization (template {template.name!r}, "
                            f"max_length {max_length}): template/tokenizer mismatch or sample too long")
    return Encoded(ids, labels, keep)


def encode_prompt(template: Template, tok, turns: Turns, image: int | list[int]) -> list[int]:
    """Token ids of a prompt ending with a user turn, ready for generation."""
    ids, _ = tokenize_segments(template.segments(turns, tok, True), tok, image)
    return ids


def check_template_name(name: str) -> None:
    if name != "auto" and name not in TEMPLATES:
        raise PhivlmError(f"unknown template {name!r}; valid: {', '.join(['auto', *TEMPLATES.names()])}")


def resolve_template_name(name: str, tok) -> str:
    """``auto``: the tokenizer's own chat template where it has one, else the Phi-2 template."""
    check_template_name(name)
    if name == "auto":
        return "chat" if getattr(tok, "chat_template", None) else "phi"
    return name


def get_template(name: str) -> Template:
    return TEMPLATES.get(name)()
