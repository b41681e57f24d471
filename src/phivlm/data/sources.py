"""Readers for the real annotation files: COCO captions JSON and LLaVA conversation JSON.

Both give a list of :class:`Sample` (an image file name and a conversation). The format is
detected from the file: a JSON object with ``annotations`` is COCO, a JSON list is LLaVA.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ..registry import PhivlmError
from .templates import IMAGE_TOKEN, Turns

log = logging.getLogger(__name__)
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class Sample:
    id: str
    image: str  # file name relative to the image folder
    turns: Turns
    types: list[str] | None = None  # question type of each Q&A pair, where the data has them


class BadRecord(PhivlmError):
    """One record is malformed; the reader fails or (with skip_bad) skips and counts it."""


def read_json(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise PhivlmError(f"{p}: annotation file not found")
    try:
        with p.open("rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PhivlmError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise PhivlmError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None


def load_samples(path: str | Path, limit: int = 0, seed: int = 0, skip_bad: bool = False,
                 skipped: list[dict] | None = None) -> list[Sample]:
    """Read COCO or LLaVA annotations; ``limit`` keeps a seeded random subset of images."""
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        samples = _coco(data, path, skip_bad, skipped)
    elif isinstance(data, list):
        samples = _llava(data, path, skip_bad, skipped)
    else:
        raise PhivlmError(f"{path}: expected a COCO captions object (with 'images' and 'annotations') "
                          f"or a LLaVA list of conversations, got {type(data).__name__}")
    if limit:
        images = sorted({s.image for s in samples})
        keep = set(random.Random(seed).sample(images, min(limit, len(images))))
        samples = [s for s in samples if s.image in keep]
    if not samples:
        raise PhivlmError(f"{path}: no usable samples")
    return samples


def _record_error(path, where: str, msg: str, skip_bad: bool, skipped: list | None) -> None:
    if not skip_bad:
        raise BadRecord(f"{path}: {where}: {msg}")
    log.warning("skipping %s in %s: %s", where, path, msg)
    if skipped is not None:
        skipped.append({"file": str(path), "record": where, "reason": msg})


def _coco(data: dict, path, skip_bad: bool, skipped) -> list[Sample]:
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise PhivlmError(f"{path}: COCO file needs lists 'images' and 'annotations'")
    files = {}
    for im in data["images"]:
        if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str):
            files[im["id"]] = im["file_name"]
    out = []
    for i, ann in enumerate(data["annotations"]):
        where = f"annotation {i}"
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
            _record_error(path, where, "missing or empty 'caption'", skip_bad, skipped)
            continue
        if ann.get("image_id") not in files:
            _record_error(path, where, f"image_id {ann.get('image_id')!r} not in 'images'", skip_bad, skipped)
            continue
        out.append(Sample(str(ann.get("id", i)), files[ann["image_id"]],
                          [("user", IMAGE_TOKEN), ("assistant", ann["caption"].strip())]))
    return out


def _llava(data: list, path, skip_bad: bool, skipped) -> list[Sample]:
    out = []
    for i, rec in enumerate(data):
        where = f"record {i}" + (f" (id {rec.get('id')})" if isinstance(rec, dict) and "id" in rec else "")
        try:
            out.append(_llava_record(rec, i))
        except BadRecord as e:
            _record_error(path, where, str(e), skip_bad, skipped)
    return out


def _llava_record(rec, i: int) -> Sample:
    if not isinstance(rec, dict):
        raise BadRecord("record is not an object")
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        raise BadRecord("missing 'image'")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRecord("missing 'conversations'")
    turns: Turns = []
    for j, turn in enumerate(conv):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise BadRecord(f"turn {j} needs 'from' (human|gpt) and a string 'value'")
        if role != ("user" if j % 2 == 0 else "assistant"):
            raise BadRecord(f"turn {j} is {turn['from']!r}: turns must alternate human/gpt from human")
        if role == "assistant" and not turn["value"].strip():
            raise BadRecord(f"turn {j} has an empty answer")
        turns.append((role, turn["value"]))
    if len(turns) % 2:
        raise BadRecord("conversation ends with a human turn (no answer)")
    n_img = sum(t.count(IMAGE_TOKEN) for _, t in turns)
    if n_img != 1 or IMAGE_TOKEN not in turns[0][1]:
        raise BadRecord(f"{IMAGE_TOKEN} must appear exactly once, in the first human turn (found {n_img})")
    # LLaVA's own normalisation: the image goes first, before the question text.
    q = turns[0][1].replace(IMAGE_TOKEN, "").strip()
    turns[0] = ("user", f"{IMAGE_TOKEN}\n{q}" if q else IMAGE_TOKEN)
    types = rec.get("types") if isinstance(rec.get("types"), list) else None
    return Sample(str(rec.get("id", i)), rec["image"], turns, types)
