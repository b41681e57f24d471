"""Helpers shared by the tests: the CLI in a subprocess, a checkpoint's weights and how far two checkpoints are
apart, a run's log records, and the next-token logits of a loaded model. (Fixtures live in conftest.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

CLI = ("-m", "phivlm.cli")


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this one's (PHIVLM_CACHE, the built-in models, included) with one
    thread per process: tiny matrices on a busy machine are many times faster so, and bitwise comparisons between
    processes need the same threads in each."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_cli(*argv, program: tuple = CLI, **popen) -> subprocess.Popen:
    """``python -m phivlm.cli argv...`` (or ``python program... argv...``) started in the background."""
    return subprocess.Popen([sys.executable, *map(str, program), *map(str, argv)], env=cli_env(), **popen)


def run_cli(*argv, program: tuple = CLI, stdin: str | None = None, returncode: int = 0,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI (or ``program``) to its end; it must exit with ``returncode`` (stderr's tail shows otherwise)."""
    p = subprocess.run([sys.executable, *map(str, program), *map(str, argv)], input=stdin, env=cli_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == returncode, p.stderr[-3000:]
    return p


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's projector, separator and feature statistics, and its LoRA adapter or full LM if any."""
    w = load_file(str(ckpt / "projector.safetensors"))
    for sub, f in (("adapter", "adapter_model.safetensors"), ("lm", "model.safetensors")):
        if (ckpt / sub / f).is_file():
            w |= {f"{sub}.{k}": v for k, v in load_file(str(ckpt / sub / f)).items()}
    return w


def max_diff(a: Path, b: Path) -> float:
    """The largest difference between two checkpoints' weights (the same tensors, the LM's included)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and any(k.startswith(("adapter.", "lm.")) for k in wa)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def log_records(run: Path) -> list[dict]:
    """The records of a run's ``log.jsonl``."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def first_logits(assistant, image, question: str) -> torch.Tensor:
    """The next-token logits after ``question`` about ``image`` (a PIL image), asked of an ``infer.Assistant``."""
    from phivlm.data.templates import encode_prompt

    a = assistant
    ids = torch.tensor([encode_prompt(a.template, a.tok, [("user", a.first_turn(question))],
                                      a.loaded.tower.num_patches)])
    with torch.no_grad():
        return a.loaded.vlm.prefill(ids, torch.ones_like(ids), a.features([image]))[0]
