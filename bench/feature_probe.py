"""Linear probes on cached vision features of the synthetic set: is colour / shape in the features at all?

Reads a `phivlm data synth` folder and the feature cache `phivlm features` wrote for it, standardises
the features per dimension (as the model does), and trains two linear probes on the first 90% of
images, scored on the rest:
- patch colour: each 32x32 patch's dominant shape colour, or background (7 classes);
- object shape: the 3x3 patches around each object's centre, concatenated (3 classes).

    python bench/feature_probe.py --data data/synth --features .cache/features
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from phivlm.data.features import FeatureStore
from phivlm.data.synth import COLORS, POSITIONS, SHAPES

PATCH, GRID = 32, 7


def patch_colours(path: Path) -> list[int]:
    """Per patch: 1 + index of the colour covering most of it (at least 50 px), else 0 (background)."""
    im = np.asarray(Image.open(path).convert("RGB")).astype(int)
    out = []
    for r in range(GRID):
        for c in range(GRID):
            p = im[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].reshape(-1, 3)
            counts = [(np.abs(p - np.array(rgb)).sum(1) < 30).sum() for rgb in COLORS.values()]
            out.append(1 + int(np.argmax(counts)) if max(counts) > 50 else 0)
    return out


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int = 300) -> float:
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x[train]), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(x[~train]).argmax(-1) == y[~train]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a `phivlm data synth` output folder")
    ap.add_argument("--features", required=True, help="feature-cache root (one sub-folder per tower)")
    a = ap.parse_args()
    data = Path(a.data)
    images = [im for split in ("train", "val")
              for im in json.loads((data / f"captions_{split}.json").read_text())["images"]]
    store = FeatureStore(next(p for p in Path(a.features).iterdir() if (p / "meta.json").is_file()))
    feats = store.get([im["file_name"] for im in images])
    flat = feats.reshape(-1, feats.shape[-1])
    feats = (feats - flat.mean(0)) / flat.std(0).clamp(min=1e-4)
    n_train = int(0.9 * len(images))

    colours = torch.tensor([patch_colours(data / "images" / im["file_name"]) for im in images])
    train = torch.zeros_like(colours, dtype=torch.bool)
    train[:n_train] = True
    acc_colour = probe(feats.reshape(-1, feats.shape[-1]), colours.reshape(-1), train.reshape(-1))

    x, y, tr = [], [], []
    for i, im in enumerate(images):
        for o in im["objects"]:
            row, col = divmod(POSITIONS.index(o["position"]), 3)
            pr, pc = int((row + 0.5) * 224 / 3 // PATCH), int((col + 0.5) * 224 / 3 // PATCH)
            cells = [min(max(pr + dr, 0), GRID - 1) * GRID + min(max(pc + dc, 0), GRID - 1)
                     for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
            x.append(feats[i, cells].reshape(-1))
            y.append(SHAPES.index(o["shape"]))
            tr.append(i < n_train)
    acc_shape = probe(torch.stack(x), torch.tensor(y), torch.tensor(tr))
    print(f"tower {store.meta['tower']}: patch colour {acc_colour:.1%} (7 classes), "
          f"object shape from 3x3 patches {acc_shape:.1%} (3 classes); held-out images {len(images) - n_train}")


if __name__ == "__main__":
    main()
