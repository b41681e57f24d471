"""Crash-safe folder writes (checkpoints, exports, built-in models): a folder of that name is always complete."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phivlm import folders
from phivlm.config import RunConfig
from phivlm.folders import atomic_folder
from phivlm.loading.checkpoint import PROJECTOR_FILE, resolve_checkpoint


def write(out: Path, text: str) -> None:
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(text)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_replace_and_failure_keep_a_complete_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    out = tmp_path / "ckpt"
    write(out, "one")
    write(out, "two")
    assert (out / "a.txt").read_text() == (out / "sub" / "b.txt").read_text() == "two"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("three")
            raise RuntimeError("disk full")
    assert (out / "a.txt").read_text() == "two" and leftovers(out) == []


CRASH = """
import os, sys, shutil
from pathlib import Path
from phivlm import folders
mode, out = sys.argv[1], Path(sys.argv[2])
if mode == "between-renames":  # the fallback path, killed after moving the old folder aside
    folders._exchange = lambda a, b: False
    real = os.replace
    def replace(a, b):
        real(a, b)
        if Path(b).name.startswith("." + out.name + ".old-"):
            os._exit(9)
    folders.os.replace = replace
else:  # killed right after the exchange, before removing the previous folder
    real = folders._exchange
    folders._exchange = lambda a, b: os._exit(9 if real(a, b) else 3)
with folders.atomic_folder(out) as tmp:
    (tmp / "a.txt").write_text("new")
"""


def crash(mode: str, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH, mode, str(out)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr


def test_crash_between_renames_recovers_previous(tmp_path):
    out = tmp_path / "ckpt"
    write(out, "old")
    crash("between-renames", out)
    assert not out.exists() and any(".old-" in n for n in leftovers(out))
    folders.recover(out)  # what every reader and the next write do first
    assert (out / "a.txt").read_text() == "old"
    write(out, "next")
    assert (out / "a.txt").read_text() == "next" and leftovers(out) == []


def test_crash_after_exchange_is_complete_and_cleaned(tmp_path):
    out = tmp_path / "ckpt"
    write(out, "old")
    if not folders._exchange(out, out):  # the file system cannot exchange: the other path covers it
        pytest.skip("RENAME_EXCHANGE unsupported here")
    crash("after-exchange", out)
    assert (out / "a.txt").read_text() == "new"
    assert any(".tmp-" in n for n in leftovers(out))  # the previous folder, not yet removed
    write(out, "next")
    assert (out / "a.txt").read_text() == "next" and leftovers(out) == []


def test_checkpoint_reader_recovers_an_interrupted_save(tmp_path):
    """A checkpoint whose replacement was killed mid-swap still loads: the previous one is put back."""
    out = tmp_path / "run" / "checkpoint"
    with atomic_folder(out) as tmp:
        RunConfig().save(tmp / "config.yaml")
        (tmp / PROJECTOR_FILE).write_bytes(b"weights")
    crash("between-renames", out)
    assert not out.exists()
    assert resolve_checkpoint(tmp_path / "run") == out and (out / PROJECTOR_FILE).read_bytes() == b"weights"
