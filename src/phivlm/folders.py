"""Crash-safe folder writes: checkpoints, exports and built-in models are written into a temporary folder,
fsync-ed, then put in place so that a folder of that name is always complete, before, during and after.

Replacing an existing folder is one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``). Where that
is unavailable it takes two renames; a crash between them leaves ``.<name>.old-<pid>`` and no ``<name>``,
which ``recover`` (run before every write and by readers) puts back.
"""
from __future__ import annotations

import ctypes
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the OS or file system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(p: Path) -> int:
    tail = p.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def recover(out: Path) -> None:
    """Undo what a crash mid-write left: the previous folder comes back if ``out`` is missing; leftovers of
    processes no longer running are removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    olds = sorted((p for p in out.parent.glob(f".{out.name}.old-*") if not _alive(_pid(p))),
                  key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    tmps = [p for p in out.parent.glob(f".{out.name}.tmp-*") if not _alive(_pid(p))]
    for p in olds + tmps:
        shutil.rmtree(p, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then the folder entries themselves."""
    for p in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, out: Path) -> None:
    """Make the complete folder ``tmp`` be ``out``, replacing any previous ``out``."""
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp:`` write into ``tmp``; on success it becomes ``out`` (crash-safe);
    on an exception nothing changes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
