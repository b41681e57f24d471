"""Evaluation outputs: ``metrics.json``, ``predictions.jsonl``, and a ``report.md`` with metric tables,
example predictions with image thumbnails, and a PNG of the training and validation loss curves read from
the run's ``log.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

from ..data.images import image_path, open_rgb
from .baselines import DESCRIPTIONS
from .caption_metrics import METRICS

THUMB_SIZE = 96
CONDITION_NAMES = {"model": "model", "blind": "blind (zero features)", "shuffled": "shuffled (other image)"}


def find_log(checkpoint: str | Path) -> Path | None:
    """The ``log.jsonl`` of the run a checkpoint belongs to: the run folder, the checkpoint's parent, or (for an
    intermediate ``checkpoints/step-N``) its grandparent."""
    p = Path(checkpoint)
    for folder in (p, p.parent, p.parent.parent):
        if (folder / "log.jsonl").is_file():
            return folder / "log.jsonl"
    return None


def read_losses(log: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) ``(step, loss)`` series of the last run logged in ``log`` (runs append to it)."""
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    last_step = -1
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if "loss" in rec:
            if step <= last_step and train:  # a new run appended to the same log: keep only the last
                train, val = [], []
            last_step = step
            train.append((step, float(rec["loss"])))
        elif "val_loss" in rec:
            val.append((step, float(rec["val_loss"])))
    return train, val


def plot_losses(log: Path, png: Path) -> list[str]:
    """Plot the loss curves into ``png``; returns the labels of the curves drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_losses(log)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        for series, label, style in ((train, "train", "-"), (val, "validation", "o-")):
            if series:
                ax.plot(*zip(*series), style, label=label, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png)
        return [line.get_label() for line in ax.get_lines()]
    finally:
        plt.close(fig)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "∅"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _qa_tables(task: dict, conditions: list[str]) -> list[str]:
    lines = []
    for metric, title in (("vqa_accuracy", "VQAv2 accuracy"), ("exact_match", "Exact match")):
        by = task["scores"]
        rows = [[k, str(task["counts"][k])] + [f"{by[c][metric][k]:.1%}" for c in conditions]
                for k in by[conditions[0]][metric]]
        lines += [f"**{title}**", "", *_table(["question type", "n"] + [CONDITION_NAMES[c] for c in conditions], rows)]
    return lines


def _caption_table(task: dict, conditions: list[str]) -> list[str]:
    rows = [[m] + [f"{task['scores'][c][m]:.3f}" for c in conditions] for m in METRICS]
    return _table(["metric"] + [CONDITION_NAMES[c] for c in conditions], rows)


def _examples(out: Path, name: str, items: list[dict], image_dir: Path, conditions: list[str], k: int) -> list[str]:
    picked = items[:: max(1, len(items) // k)][:k]
    (out / "thumbs").mkdir(exist_ok=True)
    rows = []
    for i, it in enumerate(picked):
        thumb = Path("thumbs") / f"{name}_{i:03d}.png"
        im = open_rgb(image_path(image_dir, it["image"]))
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        im.save(out / thumb)
        ref = it["refs"][0] + (f" (+{len(it['refs']) - 1})" if len(it["refs"]) > 1 else "")
        prompt = [_cell(it["prompt"])] if name == "qa" else []
        rows.append([f"![{_cell(it['image'])}]({thumb.as_posix()})", *prompt, _cell(ref),
                     *(_cell(it[c]) for c in conditions)])
    header = ["image", *(["question"] if name == "qa" else []), "reference", *(CONDITION_NAMES[c] for c in conditions)]
    return _table(header, rows)


def write_report(out: Path, metrics: dict, predictions: dict[str, list[dict]], image_dir: str | Path,
                 checkpoint: str | Path, examples: int = 8) -> Path:
    """Write ``metrics.json``, ``predictions.jsonl``, ``report.md``, ``loss.png`` and thumbnails into ``out``;
    returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for ps in predictions.values() for p in ps)
    conditions = metrics["conditions"]
    lines = [f"# Evaluation of `{metrics['checkpoint']}`", "",
             f"Images: `{metrics['images']}`. Metrics: [metrics.json](metrics.json); "
             f"all predictions: [predictions.jsonl](predictions.jsonl).", ""]
    if len(conditions) > 1:
        replaced = ", ".join(f"*{c}* by {DESCRIPTIONS[c]}" for c in conditions[1:])
        lines += [f"Grounding baselines answer the same prompts with the image features replaced: {replaced}. "
                  f"A model that uses the image scores far above {'both' if len(conditions) > 2 else 'it'}.", ""]
    for name, task in metrics["tasks"].items():
        title = "Question answering" if name == "qa" else "Captioning (COCO protocol, no SPICE)"
        unit = "questions" if name == "qa" else "images"
        lines += [f"## {title}", "", f"`{task['source']}`: {task['n']} {unit}.", ""]
        lines += _qa_tables(task, conditions) if name == "qa" else _caption_table(task, conditions)
        lines += ["### Examples", "", *_examples(out, name, predictions[name], Path(image_dir), conditions, examples)]
    lines += ["## Training", ""]
    log = find_log(checkpoint)
    if log is None:
        lines += ["No `log.jsonl` found next to the checkpoint, so no loss curves.", ""]
    else:
        curves = plot_losses(log, out / "loss.png")
        lines += [f"Loss curves ({', '.join(curves) or 'none logged'}) from `{log}`:", "",
                  "![loss curves](loss.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
