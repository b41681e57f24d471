"""``phivlm eval``: answer held-out questions and/or caption held-out images with a checkpoint, with the
grounding baselines, score them, and write ``metrics.json``, ``predictions.jsonl`` and ``report.md``.

Input kinds are detected from the file: a COCO captions object (captioning against all references of an
image), a LLaVA conversation list (each gpt turn answers the human turn before it; every question is asked
on its own about the image) or a JSONL of ``{image, question, answer[, type]}`` (``answer`` may be a list of
reference answers, scored with the VQAv2 rule).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.images import image_path, open_rgb
from ..data.sources import load_samples
from ..data.templates import IMAGE_TOKEN
from ..generate import GenerationConfig
from ..infer import Assistant
from ..errors import PhivlmError
from . import caption_metrics as cm
from .baselines import BASELINES
from .report import write_report
from .vqa import score_answers

MAX_NEW_TOKENS = {"qa": 16, "captions": 48}


@dataclass
class Item:
    image: str
    prompt: str  # the question; "" asks for a caption
    refs: list[str]
    type: str | None = None


def read_task(path: str | Path, limit: int = 0) -> tuple[str, list[Item]]:
    """("qa" | "captions", items) from a COCO, LLaVA or JSONL file; ``limit`` keeps the first N images."""
    p = Path(path)
    if not p.is_file():
        raise PhivlmError(f"{p}: evaluation data not found")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PhivlmError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError:
        data = None  # not one JSON document: JSONL
    if isinstance(data, dict) and "annotations" in data:
        kind, items = "captions", _coco(p)
    elif isinstance(data, list):
        kind, items = "qa", _llava(p)
    else:
        kind, items = "qa", _jsonl(p)
    if limit:
        keep = set(list(dict.fromkeys(it.image for it in items))[:limit])
        items = [it for it in items if it.image in keep]
    if not items:
        raise PhivlmError(f"{p}: nothing to evaluate")
    return kind, items


def _coco(path: Path) -> list[Item]:
    refs: dict[str, list[str]] = {}
    for s in load_samples(path):
        refs.setdefault(s.image, []).append(s.turns[-1][1])
    return [Item(image, "", r) for image, r in refs.items()]


def _llava(path: Path) -> list[Item]:
    items = []
    for s in load_samples(path):
        pairs = [(s.turns[i][1].replace(IMAGE_TOKEN, "").strip(), s.turns[i + 1][1])
                 for i in range(0, len(s.turns), 2)]
        types = s.types if s.types and len(s.types) == len(pairs) else [None] * len(pairs)
        items += [Item(s.image, q, [a], t) for (q, a), t in zip(pairs, types)]
    return items


def _jsonl(path: Path) -> list[Item]:
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            if not (isinstance(row["image"], str) and isinstance(row["question"], str) and answers
                    and all(isinstance(a, str) for a in answers)):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PhivlmError(f"{path}: line {i + 1}: expected a COCO captions object, a LLaVA list, or JSONL "
                              "rows with string 'image', 'question' and 'answer' (a string or a list)") from None
        items.append(Item(row["image"], row["question"], answers, row.get("type")))
    return items


@torch.no_grad()
def image_features(assistant: Assistant, image_dir: str | Path, names: list[str], batch_size: int) -> torch.Tensor:
    """(N, patches, d) features of the named images, on the CPU."""
    out = []
    for start in tqdm(range(0, len(names), batch_size), desc="features", unit="batch"):
        ims = [open_rgb(image_path(image_dir, n)) for n in names[start:start + batch_size]]
        out.append(assistant.features(ims).cpu())
    return torch.cat(out)


def predict(assistant: Assistant, items: list[Item], feats: torch.Tensor, row: dict[str, int], batch_size: int,
            max_new_tokens: int, desc: str) -> list[str]:
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    preds: list[str] = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        chunk = items[start:start + batch_size]
        convs = [[("user", assistant.first_turn(it.prompt))] for it in chunk]
        preds += assistant.answer([], convs, gen, features=feats[[row[it.image] for it in chunk]])
    return preds


def evaluate(checkpoint: str | Path, data: list[str | Path], images: str | Path, out: str | Path = "eval",
             limit: int = 0, batch_size: int = 32, baselines: Sequence[str] | None = None,
             device: str = "auto", seed: int = 0, trust_remote_code: bool = False) -> tuple[Path, dict]:
    """Evaluate on each file of ``data`` with the named grounding ``baselines`` (None: all); returns
    (report path, metrics)."""
    baselines = list(BASELINES) if baselines is None else baselines
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise PhivlmError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    tasks: dict[str, list[Item]] = {}
    for path in data:
        kind, items = read_task(path, limit)
        if kind in tasks:
            raise PhivlmError(f"{path}: a second {kind} file; give one of each kind at most")
        tasks[kind] = items
    if "captions" in tasks:
        cm.prepare()  # METEOR's Java process loads while the model generates
    assistant = Assistant(checkpoint, device, trust_remote_code=trust_remote_code)
    names = list(dict.fromkeys(it.image for items in tasks.values() for it in items))
    row = {n: i for i, n in enumerate(names)}
    feats = {"model": image_features(assistant, images, names, batch_size)}
    feats.update({name: BASELINES[name](feats["model"], seed) for name in baselines})
    sources = dict(zip(tasks, map(str, data)))
    metrics: dict = {"checkpoint": str(Path(checkpoint).resolve()), "images": str(Path(images).resolve()),
                     "conditions": list(feats), "tasks": {}}
    predictions: dict[str, list[dict]] = {}
    for kind, items in tasks.items():
        preds = {c: predict(assistant, items, f, row, batch_size, MAX_NEW_TOKENS[kind], f"{kind} ({c})")
                 for c, f in feats.items()}
        predictions[kind] = [{"task": kind, **vars(it), **{c: preds[c][i] for c in feats}}
                             for i, it in enumerate(items)]
        entry: dict = {"source": sources[kind], "n": len(items)}
        if kind == "qa":
            counts = Counter(it.type for it in items if it.type)
            entry["counts"] = {"all": len(items), **dict(sorted(counts.items()))}
            entry["scores"] = {c: score_answers([it.refs for it in items], p, [it.type for it in items])
                               for c, p in preds.items()}
        else:
            refs = {it.image: it.refs for it in items}
            entry["scores"] = cm.caption_metrics(refs, {c: dict(zip(refs, p)) for c, p in preds.items()})
        metrics["tasks"][kind] = entry
    report = write_report(Path(out), metrics, predictions, images, checkpoint)
    return report, metrics


def summary(metrics: dict) -> str:
    """A few console lines: the headline score of each task under each condition."""
    lines = []
    for kind, task in metrics["tasks"].items():
        key, metric = ("vqa_accuracy", "VQAv2 accuracy") if kind == "qa" else ("CIDEr", "CIDEr")
        vals = [f"{c} {(s[key]['all'] if kind == 'qa' else s[key]):.3f}" for c, s in task["scores"].items()]
        lines.append(f"{kind} ({task['n']}), {metric}: " + ", ".join(vals))
    return "\n".join(lines)
