"""Resumable training state: periodic checkpoints with optimizer, scheduler and RNG states.

Periodic checkpoints live in ``<output>/checkpoints/step-NNNNNNN``; each is written atomically by
``save_checkpoint`` (temporary folder, fsync, rename), so every folder with that name is complete,
and a process killed mid-write leaves only a temporary folder that is ignored (and deleted by ``rotate``).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import PhivlmError

STEP_DIR = re.compile(r"^step-(\d{7})$")
TRAINER_FILE = "trainer.pt"  # optimizer, scheduler and torch RNG tensors; loaded with weights_only=True
RUN_FILE = "run.json"  # the fingerprint of the run a periodic checkpoint belongs to
# settings a resumed run may change: where it writes, how often it logs, saves and evaluates, how it loads data,
# how it splits the global batch over processes and micro-batches, shards and recomputes
MAY_CHANGE = {"train.output", "train.resume", "train.save_every", "train.keep_last", "train.log_every",
              "train.eval_every", "train.workers", "train.device", "train.batch_size", "train.grad_accum",
              "train.fsdp", "train.compile", "tuning.gradient_checkpointing"}


def fingerprint(cfg, init: Path | None, world: int = 1) -> dict[str, str]:
    """What makes two runs the same: every other setting, the global batch, the starting checkpoint, and the
    size and mtime of the data files."""
    fp = {f"{section}.{k}": json.dumps(v, sort_keys=True) for section, values in cfg.to_dict().items()
          for k, v in values.items() if f"{section}.{k}" not in MAY_CHANGE}
    fp["global batch"] = str(cfg.train.batch_size * cfg.train.grad_accum * world)
    fp["init"] = str(init or "")
    for key in ("data", "val_data"):
        path = Path(getattr(cfg.data, key) or "")
        if path.is_file():
            st = path.stat()
            fp[f"data.{key} (file)"] = f"{st.st_size} bytes, mtime {st.st_mtime_ns}"
    return fp


def check_same_run(folder: Path, fp: dict[str, str]) -> None:
    """Refuse to auto-resume a periodic checkpoint of another run (other settings or data) in the output folder."""
    saved_file = folder / RUN_FILE
    if not saved_file.is_file():
        raise PhivlmError(f"{folder}: no run fingerprint ({RUN_FILE}), so it cannot be checked to be this run; "
                          f"pass --resume {folder} to continue from it anyway, or --resume none to start over")
    saved = json.loads(saved_file.read_text())
    diff = sorted(k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k))
    if diff:
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise PhivlmError(f"{folder.parent.parent}: holds a resumable run with other settings or data "
                          f"({', '.join(diff[:4])}{more}); start over with --resume none, use another --output, "
                          f"or continue from it with --resume {folder}")


def step_dir(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"step-{step:07d}"


def step_dirs(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file()] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def latest(output: Path) -> Path | None:
    dirs = step_dirs(output)
    return dirs[-1] if dirs else None


def rotate(output: Path, keep: int) -> None:
    """Delete all but the ``keep`` latest periodic checkpoints, and the temporary folders of killed writers."""
    folder = output / "checkpoints"
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".step-")] if folder.is_dir() else []
    for old in leftovers + (step_dirs(output)[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


def writer(opt, sched, step: int, fp: dict[str, str]):
    """A function that writes the training state into a checkpoint folder (for ``save_checkpoint``).
    ``opt``: the optimizer, or its state dict (one gathered from FSDP shards); ``fp``: the run's fingerprint."""

    def write(folder: Path) -> None:
        (folder / RUN_FILE).write_text(json.dumps(fp, indent=1, sort_keys=True))
        optimizer = opt if isinstance(opt, dict) else opt.state_dict()
        torch.save({"optimizer": optimizer, "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   folder / TRAINER_FILE)
        np_state = np.random.get_state()
        (folder / "rng.json").write_text(json.dumps({
            "step": step, "python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}))

    return write


def restore(folder: Path, opt, sched, load_optimizer: Callable[[dict], None] | None = None) -> int:
    """Load optimizer, scheduler and RNG states; returns the step to continue from. ``load_optimizer`` loads the
    saved optimizer state instead of ``opt.load_state_dict`` (e.g. into an FSDP-sharded optimizer)."""
    try:
        state = torch.load(folder / TRAINER_FILE, weights_only=True)
        rng = json.loads((folder / "rng.json").read_text())
    except (OSError, RuntimeError, ValueError) as e:
        raise PhivlmError(f"{folder}: cannot read training state ({type(e).__name__})") from None
    (load_optimizer or opt.load_state_dict)(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_tuples(rng["python"]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    return int(rng["step"])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
