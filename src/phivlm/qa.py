"""Question answering on held-out images: predictions, normalised accuracy by question type, and the
shuffled-image baseline (each question asked about another image) that shows the model uses the image."""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from .data.images import image_path, open_rgb
from .generate import GenerationConfig
from .infer import Assistant


def read_qa(path: str | Path) -> list[dict]:
    """JSONL rows of {image, question, answer[, type]}."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def shuffled_images(rows: list[dict], seed: int = 0) -> list[str]:
    """A permutation of the rows' images in which no row keeps its own image."""
    images = [r["image"] for r in rows]
    distinct = sorted(set(images))
    rng = random.Random(seed)
    out = []
    for img in images:
        other = rng.choice(distinct)
        while other == img and len(distinct) > 1:
            other = rng.choice(distinct)
        out.append(other)
    return out


def answer_rows(assistant: Assistant, rows: list[dict], image_dir: str | Path, images: list[str] | None = None,
                batch_size: int = 32, gen: GenerationConfig | None = None, desc: str = "answer") -> list[str]:
    gen = gen or GenerationConfig(max_new_tokens=16)
    images = images or [r["image"] for r in rows]
    cache: dict[str, object] = {}
    preds: list[str] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        chunk = range(start, min(start + batch_size, len(rows)))
        imgs = []
        for i in chunk:
            if images[i] not in cache:
                cache[images[i]] = open_rgb(image_path(image_dir, images[i]))
            imgs.append(cache[images[i]])
        convs = [[("user", assistant.first_turn(rows[i]["question"]))] for i in chunk]
        preds += assistant.answer(imgs, convs, gen)
    return preds


def accuracy(rows: list[dict], preds: list[str]) -> dict[str, float]:
    """Exact match after normalisation, overall and per question type."""
    hits: dict[str, list[int]] = defaultdict(list)
    for r, p in zip(rows, preds):
        ok = int(normalize(p) == normalize(r["answer"]))
        hits["all"].append(ok)
        if "type" in r:
            hits[r["type"]].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
