"""The feature cache: every image encoded once by the frozen tower, stored in memory-mapped shards.

Layout of ``<root>/<key>/``: ``meta.json`` (tower identity, image folder and shapes), and per shard
``shard_<time>-<pid>-<random>.npy`` (float16, (n, patches, d)) plus a ``.json`` of the same name (the
file names in order, each with the size and mtime of the file it was encoded from). The ``.json`` is
written last, so a shard exists only when complete: an interrupted run resumes keeping finished shards.

- The key hashes the tower's identity (config, preprocessing, feature layer, weights) and the resolved
  image folder: features of another tower or another folder with the same file names are never reused.
- A row whose image file changed since it was encoded (size or mtime) is re-encoded; the newer shard
  wins (shard names sort by time).
- Shard names are unique per writer, so processes sharing a cache never overwrite each other's shards;
  a shard whose names and rows disagree is skipped (counted, logged) and its images are re-encoded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..models.vision import VisionTower
from ..errors import PhivlmError
from .images import BadImage, image_path, open_rgb

log = logging.getLogger(__name__)


def cache_dir(root: str | Path, tower: VisionTower, image_dir: str | Path) -> Path:
    key = hashlib.sha256(f"{tower.identity}\n{Path(image_dir).resolve()}".encode()).hexdigest()[:16]
    return Path(root) / key


def stamp(path: Path) -> list[int]:
    """What identifies the version of an image file cheaply: [size, mtime in ns]."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _shard_name() -> str:
    """Unique per writer and sorting by time: concurrent writers never pick the same name."""
    return f"shard_{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"


class _Images(Dataset):
    def __init__(self, image_dir, names, processor):
        self.image_dir, self.names, self.processor = image_dir, names, processor

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        try:
            img = open_rgb(image_path(self.image_dir, name))
        except BadImage as e:
            return name, None, str(e)
        return name, self.processor(images=img, return_tensors="pt")["pixel_values"][0], None


def _collate(batch):
    return batch


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # per process: runs may share a cache
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureStore:
    """Read access to a feature cache folder (memory-mapped; rows fetched by image file name)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = self.folder / "meta.json"
        if not meta.is_file():
            raise PhivlmError(f"{self.folder}: not a feature cache (meta.json missing); run `phivlm features`")
        self.meta = json.loads(meta.read_text())
        self.index: dict[str, tuple[int, int]] = {}
        self.stamps: dict[str, list[int] | None] = {}
        self.shards: list[np.ndarray] = []
        self.bad_shards = 0
        shape = (self.meta.get("patches"), self.meta.get("hidden_size"))
        for js in sorted(self.folder.glob("shard_*.json")):  # by time: a newer row replaces an older one
            try:
                rows = json.loads(js.read_text())
                arr = np.load(js.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
                if not isinstance(rows, dict):  # an older cache: no stamps, so every row counts as changed
                    rows = {"names": rows, "stamps": [None] * len(rows)}
                names, stamps = rows["names"], rows["stamps"]
                if not (arr.ndim == 3 and arr.shape[0] == len(names) == len(stamps) and arr.shape[1:] == shape):
                    raise ValueError(f"{len(names)} names for rows of shape {arr.shape}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: skipping a damaged feature shard (%s); its images are encoded again", js, e)
                self.bad_shards += 1
                continue
            for row, (name, st) in enumerate(zip(names, stamps)):
                self.index[name] = (len(self.shards), row)
                self.stamps[name] = st
            self.shards.append(arr)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __len__(self) -> int:
        return len(self.index)

    def fresh(self, name: str, current: list[int]) -> bool:
        """Whether the cached row of ``name`` was encoded from the file as it is now."""
        return name in self.index and self.stamps[name] == current

    def get(self, names: list[str]) -> torch.Tensor:
        """(len(names), patches, d) float32 features."""
        missing = [n for n in names if n not in self.index]
        if missing:
            raise PhivlmError(f"{self.folder}: no cached features for {missing[0]} (and {len(missing) - 1} more)")
        rows = [self.shards[s][r] for s, r in (self.index[n] for n in names)]
        return torch.from_numpy(np.stack(rows).astype(np.float32))


def _current_stamps(image_dir: str | Path, names: list[str]) -> dict[str, list[int] | None]:
    """Each image's stamp now (None for a file that cannot be stat-ed: encoding it reports why)."""
    out: dict[str, list[int] | None] = {}
    for n in names:
        try:
            out[n] = stamp(image_path(image_dir, n))
        except (BadImage, OSError):
            out[n] = None
    return out


def build_features(tower: VisionTower, image_dir: str | Path, names: list[str], root: str | Path,
                   batch_size: int = 64, workers: int = 0, shard_size: int = 1024,
                   device: torch.device | str = "cpu", precision: str = "auto", rank: int = 0,
                   world: int = 1) -> tuple[FeatureStore, list[dict]]:
    """Encode every image in ``names`` not yet cached; returns the store and the skipped (bad) images.

    With ``world`` > 1 this process encodes only its share (every ``world``-th name from ``rank`` on, of the
    sorted names, so the split does not depend on what other ranks have written meanwhile)."""
    from ..runtime import autocast

    folder = cache_dir(root, tower, image_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PhivlmError(f"{root}: feature cache folder is not writable ({e.strerror})") from None
    meta = {"tower": tower.name, "identity": tower.identity, "images": str(Path(image_dir).resolve()),
            "patches": tower.num_patches,
            "hidden_size": tower.hidden_size, "dtype": "float16"}
    meta_path = folder / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("identity") != tower.identity:
        raise PhivlmError(f"{folder}: feature cache belongs to another vision tower")
    _atomic_save(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    done = FeatureStore(folder)
    skipped: list[dict] = []
    if not str(image_dir):
        raise PhivlmError("no image folder given (--images)")
    if not Path(image_dir).is_dir():
        raise PhivlmError(f"{image_dir}: image folder not found (--images)")
    stamps = _current_stamps(image_dir, sorted(set(names))[rank::world])
    todo = [n for n, st in stamps.items() if st is None or not done.fresh(n, st)]  # sorted, as ``stamps``
    if not todo:
        return done, skipped
    changed = sum(n in done for n in todo)
    log.info("encoding %d images (%d already cached%s) into %s", len(todo), len(stamps) - len(todo),
             f"; {changed} changed since they were encoded" if changed else "", folder)
    device = torch.device(device)
    tower.to(device)
    loader = DataLoader(_Images(image_dir, todo, tower.processor), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    buf_names: list[str] = []
    buf: list[np.ndarray] = []

    def flush():
        nonlocal buf_names, buf
        if not buf_names:
            return
        base = folder / _shard_name()
        arr = np.concatenate(buf)
        rows = {"names": buf_names, "stamps": [stamps[n] for n in buf_names]}
        _atomic_save(base.with_suffix(".npy"), lambda f: np.save(f, arr, allow_pickle=False))
        _atomic_save(base.with_suffix(".json"), lambda f: f.write(json.dumps(rows).encode()))
        buf_names, buf = [], []

    with tqdm(total=len(todo), desc="features", unit="img") as bar:
        for batch in loader:
            good = [(n, px) for n, px, err in batch if err is None]
            for n, _, err in batch:
                if err is not None:
                    log.warning("skipping image: %s", err)
                    skipped.append({"image": n, "reason": err})
            if good:
                pixels = torch.stack([px for _, px in good]).to(device)
                with autocast(device, precision):
                    feats = tower(pixels)
                buf.append(feats.float().cpu().numpy().astype(np.float16))
                buf_names += [n for n, _ in good]
            bar.update(len(batch))
            if len(buf_names) >= shard_size:
                flush()
    flush()
    return FeatureStore(folder), skipped
