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

from ..registry import PhivlmError

STEP_DIR = re.compile(r"^step-(\d{7})$")
TRAINER_FILE = "trainer.pt"  # optimizer, scheduler and torch RNG tensors; loaded with weights_only=True


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


def writer(opt, sched, step: int):
    """A function that writes the training state into a checkpoint folder (for ``save_checkpoint``).
    ``opt``: the optimizer, or its state dict (one gathered from FSDP shards)."""

    def write(folder: Path) -> None:
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
