"""Tokenized training samples and the padded batch (features looked up in the cache)."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..models.vlm import IGNORE
from .features import FeatureStore
from .sources import Sample
from .templates import Template, TemplateError, encode

log = logging.getLogger(__name__)


class VLMDataset(Dataset):
    """Samples tokenized once up front, so a template/tokenizer mismatch fails before training starts."""

    def __init__(self, samples: list[Sample], template: Template, tok, image: int | list[int], max_length: int,
                 skip_bad: bool = False, skipped: list[dict] | None = None, source: str = "data"):
        self.items: list[tuple[str, list[int], list[int]]] = []
        self.truncated = 0
        for s in tqdm(samples, desc="tokenize", unit="sample", disable=len(samples) < 5000):
            try:
                enc = encode(template, tok, s.turns, image, max_length)
            except TemplateError as e:
                if not skip_bad:
                    raise TemplateError(f"{source}: sample {s.id}: {e}") from None
                log.warning("skipping sample %s: %s", s.id, e)
                if skipped is not None:
                    skipped.append({"file": source, "record": s.id, "reason": str(e)})
                continue
            self.truncated += enc.turns_kept < len(s.turns) // 2
            self.items.append((s.image, enc.input_ids, enc.labels))
        if self.truncated:
            log.info("%d samples truncated to max_length %d (later turns dropped)", self.truncated, max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(ids) for _, ids, _ in self.items]


class Collator:
    """Right-pads a list of items into tensors; padding is masked and labelled -100."""

    def __init__(self, store: FeatureStore, pad_id: int):
        self.store, self.pad_id = store, pad_id

    def __call__(self, items):
        width = max(len(ids) for _, ids, _ in items)
        b = len(items)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, (_, ids, lab) in enumerate(items):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "image_features": self.store.get([img for img, _, _ in items])}
