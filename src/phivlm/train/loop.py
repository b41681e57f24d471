"""The training loop shared by stage 1 (pretrain) and stage 2 (finetune)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..config import RunConfig
from ..data.dataset import Collator, VLMDataset
from ..data.features import build_features
from ..data.sources import load_samples
from ..data.templates import get_template, resolve_template_name
from ..models.vision import VisionTower
from ..models.vlm import PhiVLM
from ..registry import PhivlmError
from ..runtime import autocast, pick_device, seed_everything
from .checkpoint import build_vlm, save_checkpoint
from .objectives import build_objective

log = logging.getLogger(__name__)


def prepare_output(folder: str | Path) -> Path:
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PhivlmError(f"{out}: output folder is not writable ({e.strerror})") from None
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return out


def load_data(cfg: RunConfig, tower: VisionTower, path: str, template, tok, device, skipped: list[dict]):
    """Samples of ``path`` -> (tokenized dataset, feature store); bad images fail or are skipped."""
    samples = load_samples(path, cfg.data.limit, cfg.train.seed, cfg.data.skip_bad, skipped)
    store, bad = build_features(tower, cfg.data.images, [s.image for s in samples], cfg.data.features,
                                workers=cfg.train.workers, device=device, precision=cfg.train.precision)
    if bad:
        if not cfg.data.skip_bad:
            raise PhivlmError(f"{bad[0]['reason']} (use --skip-bad to skip bad images)")
        skipped += [{"file": path, "record": b["image"], "reason": b["reason"]} for b in bad]
        samples = [s for s in samples if s.image in store]
    ds = VLMDataset(samples, template, tok, tower.num_patches, cfg.data.max_length, cfg.data.skip_bad,
                    skipped, source=path)
    if len(ds) == 0:
        raise PhivlmError(f"{path}: no trainable samples left")
    return ds, store


def param_groups(vlm: PhiVLM, cfg: RunConfig) -> list[dict]:
    own = list(vlm.projector.parameters()) + [vlm.separator]
    lm = [p for p in vlm.lm.parameters() if p.requires_grad]
    groups = [{"params": own, "lr": cfg.train.lr, "name": "projector"}]
    if lm:
        groups.append({"params": lm, "lr": cfg.train.lm_lr, "name": "lm"})
    return groups


@torch.no_grad()
def evaluate_loss(vlm: PhiVLM, loader: DataLoader, device, precision: str) -> float:
    was = vlm.training
    vlm.eval()
    total, n = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            loss = vlm(**batch)
        k = int((batch["labels"][:, 1:] != -100).sum())
        total, n = total + float(loss) * k, n + k
    vlm.train(was)
    return total / max(n, 1)


def train(cfg: RunConfig, init: Path | None = None) -> Path:
    """Train per ``cfg`` (starting from checkpoint ``init`` if given); returns the final checkpoint folder."""
    out = prepare_output(cfg.train.output)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    if cfg.data.template != "auto":
        get_template(cfg.data.template)  # fail on a bad name before any loading
    objective = build_objective(cfg.train)
    tower = VisionTower(cfg.model.vision, cfg.model.feature_layer)
    vlm, tok = build_vlm(cfg, tower.hidden_size, tower.num_patches, device, init)
    cfg.data.template = resolve_template_name(cfg.data.template, tok)
    template = get_template(cfg.data.template)
    cfg.save(out / "config.yaml")
    skipped: list[dict] = []
    ds, store = load_data(cfg, tower, cfg.data.data, template, tok, device, skipped)
    val = load_data(cfg, tower, cfg.data.val_data, template, tok, device, skipped) if cfg.data.val_data else None
    del tower

    collate = Collator(store, tok.pad_token_id)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, generator=gen, collate_fn=collate,
                        num_workers=cfg.train.workers, drop_last=len(ds) >= cfg.train.batch_size)
    steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(loader)))
    opt = torch.optim.AdamW(param_groups(vlm, cfg), weight_decay=cfg.train.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.train.warmup_ratio * steps), steps)
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    log.info("training %d steps on %d samples (%d skipped); %.2fM trainable parameters; device %s, %s",
             steps, len(ds), len(skipped), trainable / 1e6, device, cfg.train.precision)

    vlm.train()
    logf = open(out / "log.jsonl", "a")
    tb = SummaryWriter(str(out / "tb"))
    vloader = None if val is None else DataLoader(val[0], batch_size=cfg.train.batch_size,
                                                  collate_fn=Collator(val[1], tok.pad_token_id))

    def validate() -> None:
        vloss = evaluate_loss(vlm, vloader, device, cfg.train.precision)
        logf.write(json.dumps({"step": step, "val_loss": vloss}) + "\n")
        logf.flush()
        tb.add_scalar("loss/val", vloss, step)
        log.info("step %d: validation loss %.4f", step, vloss)

    step, t0, running = 0, time.time(), []
    bar = tqdm(total=steps, desc="train", unit="step")
    while step < steps:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, cfg.train.precision):
                loss = objective(vlm, batch, step, steps)
            if not torch.isfinite(loss):
                raise PhivlmError(f"non-finite loss at step {step + 1}; stopping (lower --lr?)")
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            running.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{running[-1]:.3f}")
            if step % cfg.train.log_every == 0 or step == steps:
                rec = {"step": step, "loss": sum(running) / len(running), "lr": sched.get_last_lr()[0],
                       "elapsed_s": round(time.time() - t0, 2)}
                if (tf := objective.tf_rate(step - 1, steps)) is not None:
                    rec["tf_rate"] = round(tf, 4)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                tb.add_scalar("loss/train", rec["loss"], step)
                tb.add_scalar("lr", rec["lr"], step)
                running = []
            if vloader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                validate()
            if step >= steps:
                break
    bar.close()
    if vloader is not None:
        validate()
    logf.close()
    tb.close()
    if skipped:
        with open(out / "skipped.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in skipped)
        log.warning("%d bad samples skipped; see %s", len(skipped), out / "skipped.jsonl")
    ckpt = save_checkpoint(vlm, cfg, tok, out / "checkpoint", {"step": step, "elapsed_s": time.time() - t0})
    log.info("checkpoint written to %s (%.0f s)", ckpt, time.time() - t0)
    return ckpt
