"""Readers for the real annotation files: COCO captions JSON and LLaVA conversation JSON.

Both give a list of :class:`Sample` (an image file name and a conversation). The format is
detected from the file: a JSON object with ``annotations`` is COCO, a JSON list is LLaVA.

Ids are labels for messages, not keys. Records may share an id (LLaVA-Instruct uses the image id as
the conversation id, so one image's conversations share it): such reuse is kept and reported in one
warning per file. A record that repeats an earlier one exactly (same id, image and conversation)
would silently count twice, so it is a bad record: an error, or skipped and listed with ``skip_bad``.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import PhivlmError
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
    if not str(path):
        raise PhivlmError("no annotation file given (--data)")
    if not p.is_file():
        raise PhivlmError(f"{p}: annotation file not found")
    try:
        with p.open("rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))  # a leading byte-order mark is allowed
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


class _Ids:
    """Finds exact repeats of earlier records (bad) and counts ids reused by other records (kept)."""

    def __init__(self):
        self.first: dict[str, tuple[str, Sample]] = {}
        self.reused: list[tuple[str, str, str]] = []  # (id, first record, this record)

    def check(self, s: Sample, where: str) -> None:
        prev = self.first.setdefault(s.id, (where, s))
        if prev[1] is s:
            return
        if (prev[1].image, prev[1].turns) == (s.image, s.turns):
            raise BadRecord(f"exact duplicate of {prev[0]} (id {s.id})")
        self.reused.append((s.id, prev[0], where))

    def report(self, path) -> None:
        if self.reused:
            id_, a, b = self.reused[0]
            log.warning("%s: %d records reuse the id of an earlier record (first: id %s in %s and %s); "
                        "ids are labels only, all are kept", path, len(self.reused), id_, a, b)


def _text(v) -> bool:
    """A string that is valid Unicode (JSON escapes can produce lone surrogates no tokenizer accepts)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _id(rec: dict, i: int) -> str:
    """The record's id as printable text (invalid Unicode escaped), its position if it has none."""
    return str(rec.get("id", i)).encode("utf-8", "backslashreplace").decode()


def _coco(data: dict, path, skip_bad: bool, skipped) -> list[Sample]:
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise PhivlmError(f"{path}: COCO file needs lists 'images' and 'annotations'")
    files: dict = {}
    clashes: set = set()  # image ids listed with two different file names
    for im in data["images"]:
        if isinstance(im, dict) and _key(im.get("id")) and _text(im.get("file_name")):
            if files.setdefault(im["id"], im["file_name"]) != im["file_name"]:
                clashes.add(im["id"])
    out, ids = [], _Ids()
    for i, ann in enumerate(data["annotations"]):
        try:
            s = _coco_annotation(ann, i, files, clashes)
            ids.check(s, f"annotation {i}")
            out.append(s)
        except BadRecord as e:
            _record_error(path, f"annotation {i}", str(e), skip_bad, skipped)
    ids.report(path)
    return out


def _coco_annotation(ann, i: int, files: dict, clashes: set) -> Sample:
    if not isinstance(ann, dict) or not _text(ann.get("caption")) or not ann["caption"].strip():
        raise BadRecord("missing or empty 'caption' (or not valid Unicode)")
    image_id = ann.get("image_id")
    if not _key(image_id) or image_id not in files:
        raise BadRecord(f"image_id {image_id!r} not in 'images'")
    if image_id in clashes:
        raise BadRecord(f"image_id {image_id!r} is listed in 'images' with different file names")
    return Sample(_id(ann, i), files[image_id], [("user", IMAGE_TOKEN), ("assistant", ann["caption"].strip())])


def _llava(data: list, path, skip_bad: bool, skipped) -> list[Sample]:
    out, ids = [], _Ids()
    for i, rec in enumerate(data):
        where = f"record {i}" + (f" (id {_id(rec, i)})" if isinstance(rec, dict) and "id" in rec else "")
        try:
            s = _llava_record(rec, i)
            ids.check(s, f"record {i}")
            out.append(s)
        except BadRecord as e:
            _record_error(path, where, str(e), skip_bad, skipped)
    ids.report(path)
    return out


def _llava_record(rec, i: int) -> Sample:
    if not isinstance(rec, dict):
        raise BadRecord("record is not an object")
    if not _text(rec.get("image")) or not rec["image"]:
        raise BadRecord("missing 'image' (or not valid Unicode)")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRecord("missing 'conversations'")
    turns: Turns = []
    for j, turn in enumerate(conv):
        who = turn.get("from") if isinstance(turn, dict) else None
        role = ROLES.get(who) if isinstance(who, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise BadRecord(f"turn {j} needs 'from' (human|gpt) and a string 'value'")
        if not _text(turn["value"]):
            raise BadRecord(f"turn {j} is not valid Unicode text (a lone surrogate escape)")
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
    return Sample(_id(rec, i), rec["image"], turns, types)
