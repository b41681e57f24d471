"""Inference on a loaded checkpoint: encode images, build prompts with the run's template, generate."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .data.images import open_rgb
from .data.templates import IMAGE_TOKEN, Turns, encode_prompt, get_template, image_slots
from .generate import GenerationConfig, generate
from .errors import PhivlmError
from .runtime import autocast, compute_dtype, pick_device
from .loading import Loaded
from .loading.checkpoint import load_checkpoint

CAPTION_PROMPT = "Describe the image briefly."
MAX_QUESTION_CHARS = 4000  # one question (chat, serve, generate): bounds what one prefill can cost


class Cancelled(Exception):
    """Raised inside generation when the consumer of ``stream`` has gone away."""


class Assistant:
    """A checkpoint ready to answer: ``answer`` for batches, ``stream`` for one chat turn."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str | None = None,
                 trust_remote_code: bool = False):
        self.device = pick_device(device)
        self.loaded: Loaded = load_checkpoint(checkpoint, self.device, trust_remote_code=trust_remote_code)
        self.cfg = self.loaded.cfg
        self.precision = precision or self.cfg.train.precision  # "auto" (the default) lets the host decide
        vlm = self.loaded.vlm
        if self.cfg.tuning.lm_tuning == "lora":  # one matmul per Linear instead of three (QLoRA stays unmerged)
            vlm.lm = vlm.lm.merge_and_unload()
        vlm.prepare_decoding(compute_dtype(self.device, self.precision))
        self.template = get_template(self.cfg.data.template)
        tok, tower = self.loaded.tok, self.loaded.tower
        self.eos_ids = {tok.eos_token_id}
        # what <image> becomes in a prompt
        self.slots = image_slots(tok, tower.num_patches, tower.tiles, self.cfg.model.tile_markers)

    @property
    def tok(self):
        return self.loaded.tok

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        tower = self.loaded.tower
        with autocast(self.device, self.precision):
            return tower(tower.preprocess(images).to(self.device)).float()

    @property
    def context(self) -> int:
        """The LM's context length in tokens."""
        return int(getattr(self.loaded.vlm.base_lm.config, "max_position_embeddings", 0) or 2048)

    def fit(self, turns: Turns, max_new_tokens: int) -> tuple[Turns, int]:
        """``turns`` (ending with the user's question) with the oldest exchanges dropped until the prompt and
        ``max_new_tokens`` fit the context; returns (turns, exchanges dropped). A question longer than
        MAX_QUESTION_CHARS, or one that cannot fit alone, is refused."""
        question = turns[-1][1].replace(IMAGE_TOKEN, "").strip()
        if len(question) > MAX_QUESTION_CHARS:
            raise PhivlmError(f"question too long ({len(question)} characters; at most {MAX_QUESTION_CHARS})")
        dropped = 0
        while True:
            n = len(encode_prompt(self.template, self.tok, turns, self.slots))
            if n + max_new_tokens <= self.context:
                return turns, dropped
            if len(turns) < 3:
                raise PhivlmError(f"the question ({n} prompt tokens) and {max_new_tokens} new tokens do not fit "
                                  f"the model's context of {self.context} tokens")
            rest = turns[2:]  # the oldest exchange goes; the image moves to the new first question
            turns = [(rest[0][0], self.first_turn(rest[0][1]))] + rest[1:]
            dropped += 1

    def first_turn(self, question: str) -> str:
        if self.template.name == "plain" and not question:
            return IMAGE_TOKEN
        return f"{IMAGE_TOKEN}\n{question or CAPTION_PROMPT}"

    def _batch(self, conversations: list[Turns]):
        prompts = [encode_prompt(self.template, self.tok, turns, self.slots)
                   for turns in conversations]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding, so every row continues at the last column
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def answer(self, images: list[Image.Image], conversations: list[Turns], gen: GenerationConfig,
               seed: int = 0, features: torch.Tensor | None = None) -> list[str]:
        """Answer the last user turn of each conversation (its first user turn holds ``<image>``);
        ``features`` (B, patches, d), if given, are used instead of the images' (grounding baselines)."""
        ids, mask = self._batch(conversations)
        feats = self.features(images) if features is None else features.to(self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        with autocast(self.device, self.precision):
            out = generate(self.loaded.vlm, ids, mask, feats, self.eos_ids, gen, generator=g)
        return [self.tok.decode(o, skip_special_tokens=True).strip() for o in out]

    def stream(self, image: Image.Image | None, turns: Turns, gen: GenerationConfig, seed: int = 0,
               features: torch.Tensor | None = None) -> Iterator[str]:
        """Yield the growing answer text token by token (for chat and the web demo); ``features`` (1, patches, d)
        stand for the image when given. Closing the generator stops the computation within one token."""
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        tokens: list[int] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def on_tokens(t: torch.Tensor):
            if stop.is_set():  # the caller stopped reading (a cancelled or abandoned answer): stop computing
                raise Cancelled
            if int(t[0]) >= 0:
                tokens.append(int(t[0]))
                q.put(self.tok.decode(tokens, skip_special_tokens=True))

        def work():
            try:
                ids, mask = self._batch([turns])
                g = torch.Generator(device=self.device).manual_seed(seed)
                with autocast(self.device, self.precision):
                    feats = self.features([image]) if features is None else features.to(self.device)
                    generate(self.loaded.vlm, ids, mask, feats, self.eos_ids, gen, on_tokens, g)
            except Cancelled:
                pass
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
            finally:
                q.put(None)

        worker = threading.Thread(target=work, name="phivlm-generate", daemon=True)
        worker.start()
        try:
            while (text := q.get()) is not None:
                yield text.strip()
        finally:  # also when the caller closes this generator early
            stop.set()
            worker.join()  # within one decoding step; a thread alive at exit aborts torch ("terminate called")
        if errors:
            raise errors[0]


def load_image(path: str | Path) -> Image.Image:
    return open_rgb(path)


def caption(assistant: Assistant, images: list[str], gen: GenerationConfig) -> list[str]:
    return assistant.answer([load_image(p) for p in images], [[("user", assistant.first_turn(""))]] * len(images),
                            gen)

