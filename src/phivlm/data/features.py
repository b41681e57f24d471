"""The feature cache: every image encoded once by the frozen tower, stored in memory-mapped shards.

Layout of ``<root>/<tower identity>/``: ``meta.json`` (tower identity and shapes), and per shard
``shard_NNNNN.npy`` (float16, (n, patches, d)) plus ``shard_NNNNN.json`` (the file names, in order).
The ``.json`` is written last, so a shard exists only when complete: an interrupted run resumes
keeping finished shards. The folder is named by the tower's identity hash (config, preprocessing,
feature layer and weights), so features of another tower are never reused.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..models.vision import VisionTower
from ..registry import PhivlmError
from .images import BadImage, image_path, open_rgb

log = logging.getLogger(__name__)


def cache_dir(root: str | Path, tower: VisionTower) -> Path:
    return Path(root) / tower.identity


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
        self.shards: list[np.ndarray] = []
        for js in sorted(self.folder.glob("shard_*.json")):
            arr = np.load(js.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
            for row, name in enumerate(json.loads(js.read_text())):
                self.index[name] = (len(self.shards), row)
            self.shards.append(arr)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, names: list[str]) -> torch.Tensor:
        """(len(names), patches, d) float32 features."""
        missing = [n for n in names if n not in self.index]
        if missing:
            raise PhivlmError(f"{self.folder}: no cached features for {missing[0]} (and {len(missing) - 1} more)")
        rows = [self.shards[s][r] for s, r in (self.index[n] for n in names)]
        return torch.from_numpy(np.stack(rows).astype(np.float32))


def build_features(tower: VisionTower, image_dir: str | Path, names: list[str], root: str | Path,
                   batch_size: int = 64, workers: int = 0, shard_size: int = 1024,
                   device: torch.device | str = "cpu", precision: str = "bf16") -> tuple[FeatureStore, list[dict]]:
    """Encode every image in ``names`` not yet cached; returns the store and the skipped (bad) images."""
    from ..runtime import autocast

    folder = cache_dir(root, tower)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PhivlmError(f"{root}: feature cache folder is not writable ({e.strerror})") from None
    meta = {"tower": tower.name, "identity": tower.identity, "patches": tower.num_patches,
            "hidden_size": tower.hidden_size, "dtype": "float16"}
    meta_path = folder / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("identity") != tower.identity:
        raise PhivlmError(f"{folder}: feature cache belongs to another vision tower")
    _atomic_save(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    done = FeatureStore(folder)
    todo = sorted({n for n in names if n not in done})
    skipped: list[dict] = []
    if not todo:
        return done, skipped
    if not str(image_dir):
        raise PhivlmError("no image folder given (--images)")
    if not Path(image_dir).is_dir():
        raise PhivlmError(f"{image_dir}: image folder not found (--images)")
    log.info("encoding %d images (%d already cached) into %s", len(todo), len(done), folder)
    device = torch.device(device)
    tower.to(device)
    loader = DataLoader(_Images(image_dir, todo, tower.processor), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    # after the highest complete shard (a count would overwrite a kept shard once any other is lost)
    shard_id = max((int(p.stem.split("_")[1]) for p in folder.glob("shard_*.json")), default=-1) + 1
    buf_names: list[str] = []
    buf: list[np.ndarray] = []

    def flush():
        nonlocal shard_id, buf_names, buf
        if not buf_names:
            return
        base = folder / f"shard_{shard_id:05d}"
        arr = np.concatenate(buf)
        _atomic_save(base.with_suffix(".npy"), lambda f: np.save(f, arr, allow_pickle=False))
        _atomic_save(base.with_suffix(".json"), lambda f: f.write(json.dumps(buf_names).encode()))
        shard_id, buf_names, buf = shard_id + 1, [], []

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
