"""Does a checkpoint use the image? Its standard loss on held-out data with the right image features
against the same with another image's (each image's samples get the next image's features).

A model that reads the image has a much lower loss with the right one; a projector that only acts as a
soft prompt (the same steering for every image) gives two nearly equal losses, however low they are.

    python bench/grounding_gap.py --checkpoint runs/demo/stage1/checkpoint --data runs/demo/data/captions_val.json
    python bench/grounding_gap.py --checkpoint runs/demo/stage2/checkpoint --data runs/demo/data/instruct_val.json

Images and the feature cache are the checkpoint's own (``data.images``, ``data.features`` in its config)
unless given.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from phivlm.data.dataset import Collator
from phivlm.data.templates import get_template
from phivlm.loading.checkpoint import load_checkpoint
from phivlm.train.distributed import Dist
from phivlm.train.loop import evaluate_loss, load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="COCO captions or LLaVA conversations JSON")
    ap.add_argument("--images", help="image folder (default: the checkpoint's)")
    ap.add_argument("--features", help="feature-cache root (default: the checkpoint's)")
    ap.add_argument("--limit", type=int, default=40, help="images (seeded subset; 0 = all)")
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    loaded = load_checkpoint(a.checkpoint)
    cfg, cpu = loaded.cfg, torch.device("cpu")
    cfg.data.limit = a.limit
    cfg.data.images = a.images or cfg.data.images
    cfg.data.features = a.features or cfg.data.features
    ds, store = load_data(cfg, loaded.tower, a.data, get_template(cfg.data.template), loaded.tok, cpu, [],
                          Dist())
    collate = Collator(store, loaded.tok.pad_token_id)

    images = sorted({image for image, _, _ in ds.items})
    other = dict(zip(images, images[1:] + images[:1]))  # every sample gets another image's features

    def shuffled(items):
        return collate([(other[image], ids, labels) for image, ids, labels in items])

    losses = {name: evaluate_loss(loaded.vlm, DataLoader(ds, batch_size=a.batch_size, collate_fn=fn), cpu,
                                  cfg.train.precision)
              for name, fn in (("right image", collate), ("shuffled", shuffled))}
    print(f"{len(ds)} samples of {a.data}: loss with the right image {losses['right image']:.3f}, "
          f"with shuffled images {losses['shuffled']:.3f}, gap {losses['shuffled'] - losses['right image']:.3f} nats")


if __name__ == "__main__":
    main()
