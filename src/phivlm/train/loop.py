"""The training loop shared by stage 1 (pretrain) and stage 2 (finetune)."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..config import RunConfig
from ..data.dataset import Collator, VLMDataset
from ..data.features import FeatureStore, build_features
from ..data.sources import load_samples
from ..data.templates import check_template_name, get_template, resolve_template_name
from ..models.vision import VisionTower, build_tower
from ..models.vlm import PhiVLM
from ..registry import Interrupted, PhivlmError
from ..runtime import autocast, pick_device, seed_everything
from . import distributed, fsdp, state
from .distributed import Dist
from .checkpoint import build_vlm, resolve_checkpoint, save_checkpoint
from .objectives import build_objective
from .sampler import StepBatches

log = logging.getLogger(__name__)


def prepare_output(folder: str | Path, main: bool = True) -> Path:
    out = Path(folder)
    if not main:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PhivlmError(f"{out}: output folder is not writable ({e.strerror})") from None
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "phivlm_run", False)]:  # one run log at a time
        root.removeHandler(h)
        h.close()
    handler = logging.FileHandler(out / "train.log")
    handler.phivlm_run = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return out


def load_data(cfg: RunConfig, tower: VisionTower, path: str, template, tok, device, skipped: list[dict],
              dist: Dist):
    """Samples of ``path`` -> (tokenized dataset, feature store); bad images fail or are skipped. Ranks encode
    uncached images in parallel, each its share, then wait for one another."""
    samples = load_samples(path, cfg.data.limit, cfg.train.seed, cfg.data.skip_bad, skipped)
    names = [s.image for s in samples]
    store, bad = build_features(tower, cfg.data.images, names, cfg.data.features, workers=cfg.train.workers,
                                device=device, precision=cfg.train.precision, rank=dist.rank, world=dist.world)
    if dist.world > 1:
        dist.barrier()
        store = FeatureStore(store.folder)  # every rank's shards
        own = {b["image"]: b for b in bad}
        bad = [own.get(n, {"image": n, "reason": f"{n}: could not be encoded (see the log of another rank)"})
               for n in sorted(set(names)) if n not in store]
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


FEATURE_STATS_IMAGES = 1024  # images whose cached features give the feature standardisation


def fit_feature_norm(vlm: PhiVLM, ds: VLMDataset, store) -> None:
    """Set the feature standardisation from the training images (a fixed, sorted subset: every rank agrees)."""
    names = sorted({image for image, _, _ in ds.items})[:FEATURE_STATS_IMAGES]
    vlm.feature_norm.fit(store.get(names))


def param_groups(vlm: PhiVLM, cfg: RunConfig) -> list[dict]:
    own = list(vlm.projector.parameters()) + [vlm.separator]
    lm = [p for p in vlm.lm.parameters() if p.requires_grad]
    groups = [{"params": own, "lr": cfg.train.lr, "name": "projector"}]
    if lm:
        groups.append({"params": lm, "lr": cfg.train.lm_lr, "name": "lm"})
    return groups


@torch.no_grad()
def evaluate_loss(vlm: PhiVLM, loader: DataLoader, device, precision: str, forward=None) -> float:
    """The standard loss over ``loader``; ``forward(batch)`` computes it (default ``vlm(**batch)``)."""
    forward = forward or (lambda batch: vlm(**batch))
    was = vlm.training
    vlm.eval()
    total, n = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            loss = forward(batch)
        k = int((batch["labels"][:, 1:] != -100).sum())
        total, n = total + float(loss) * k, n + k
    vlm.train(was)
    return total / max(n, 1)


class _Step(nn.Module):
    """Runs the objective inside ``forward``, so DDP sees every forward pass it must synchronise (and FSDP
    gathers the parameters outside the decoder layers around it); ``standard``: the standard loss instead."""

    def __init__(self, vlm: PhiVLM, objective):
        super().__init__()
        self.vlm, self.objective = vlm, objective

    def forward(self, batch: dict, step: int, steps: int, standard: bool = False) -> torch.Tensor:
        return self.vlm(**batch) if standard else self.objective(self.vlm, batch, step, steps)


class _MicroBatches:
    """Index lists of every micro-batch from ``start`` to ``steps``, in order (a DataLoader batch_sampler)."""

    def __init__(self, batches: StepBatches, start: int, steps: int):
        self.batches, self.start, self.steps = batches, start, steps

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield from self.batches.micro_batches(step)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batches.accum


def _n_labels(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _resume_dir(cfg: RunConfig, out: Path) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        return state.latest(out)
    folder = resolve_checkpoint(cfg.train.resume)
    if not (folder / state.TRAINER_FILE).is_file():
        raise PhivlmError(f"{folder}: not a resumable checkpoint ({state.TRAINER_FILE} missing)")
    return folder


@contextlib.contextmanager
def _sigint_flag():
    """SIGINT sets a flag (checked after each step) instead of killing the step half-way."""
    flag = {"set": False}

    def handler(signum, frame):
        flag["set"] = True

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        old = None
    try:
        yield flag
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def train(cfg: RunConfig, init: Path | None = None) -> Path:
    """Train per ``cfg`` (from checkpoint ``init`` if given); returns the final checkpoint folder.

    Under torchrun each process trains its share of every global batch with DDP; rank 0 alone
    writes logs and checkpoints. Resumes from the latest periodic checkpoint in the output folder.
    ``cfg`` is left as given: the run resolves its template and LM on its own copy.
    """
    cfg = copy.deepcopy(cfg)
    cfg.validate()  # a bad value fails before anything is loaded or written
    dist, device_name = distributed.init(cfg.train.device)
    out = prepare_output(cfg.train.output, dist.main)
    device = pick_device(device_name)
    run_fp = state.fingerprint(cfg, init, dist.world)
    resume = _resume_dir(cfg, out)
    if resume is not None:
        if cfg.train.resume == "auto":
            state.check_same_run(resume, run_fp)
        log.info("resuming from %s", resume)
        init = resume
    seed_everything(cfg.train.seed)
    check_template_name(cfg.data.template)  # fail on a bad name before any loading
    sharded = cfg.train.fsdp != "none" and dist.world > 1
    if cfg.train.fsdp != "none" and not sharded:
        log.warning("--fsdp %s with one process: nothing to shard, training unsharded", cfg.train.fsdp)
    objective = build_objective(cfg.train)
    tower = build_tower(cfg.model)
    # FSDP: built whole on the CPU, then sharded onto the device
    build_on = torch.device("cpu") if sharded else device
    vlm, tok = build_vlm(cfg, tower.hidden_size, tower.num_patches, build_on, init)
    cfg.data.template = resolve_template_name(cfg.data.template, tok)
    template = get_template(cfg.data.template)
    if init is not None and (init / "lm").is_dir():
        cfg.model.lm = str(init / "lm")  # an earlier full-tuned LM is the base from now on
    skipped: list[dict] = []
    ds, store = load_data(cfg, tower, cfg.data.data, template, tok, device, skipped, dist)
    val = (load_data(cfg, tower, cfg.data.val_data, template, tok, device, skipped, dist)
           if cfg.data.val_data else None)
    if init is None:  # a new projector: its input statistics come from this run's data
        fit_feature_norm(vlm, ds, store)
    if dist.main:
        cfg.save(out / "config.yaml")
    del tower

    t = cfg.train
    batches = StepBatches(ds.lengths(), t.batch_size, t.seed, dist.world, dist.rank, t.grad_accum,
                          t.group_by_length)
    steps = t.max_steps or max(1, math.ceil(t.epochs * batches.steps_per_epoch))
    step_module = _Step(vlm, objective)
    if sharded:
        fsdp.shard(step_module, vlm.base_lm, t.fsdp, device)  # parameters are replaced: before the optimizer
    params = [p for g in param_groups(vlm, cfg) for p in g["params"]]
    opt = torch.optim.AdamW(param_groups(vlm, cfg), weight_decay=t.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(t.warmup_ratio * steps), steps)
    start = 0 if resume is None else state.restore(
        resume, opt, sched, lambda osd: fsdp.load_optimizer_state(step_module, opt, osd, sharded))
    model: nn.Module = step_module
    if dist.world > 1 and not sharded:
        model = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    # its own generator: iterating must not draw from the global RNG just restored (dropout would shift)
    loader = DataLoader(ds, batch_sampler=_MicroBatches(batches, start, steps), num_workers=t.workers,
                        collate_fn=Collator(store, tok.pad_token_id), generator=torch.Generator().manual_seed(t.seed))
    if dist.main:
        log.info("training steps %d..%d on %d samples (%d skipped), global batch %d (%d x %d procs x %d accum), "
                 "padding %.1f%%; %.2fM trainable parameters; %s, %s", start + 1, steps, len(ds), len(skipped),
                 batches.global_size, t.batch_size, dist.world, t.grad_accum, 100 * batches.padding_fraction(),
                 sum(p.numel() for p in params) / 1e6, device, t.precision)

    vlm.train()
    logf = open(out / "log.jsonl", "a") if dist.main else None
    tb = SummaryWriter(str(out / "tb")) if dist.main else None
    # FSDP: every rank takes part in validation (the parameters are sharded); else rank 0 alone validates
    vloader = None if val is None or not (dist.main or sharded) else DataLoader(
        val[0], batch_size=t.batch_size, collate_fn=Collator(val[1], tok.pad_token_id))

    def validate() -> float:
        if not sharded:
            return evaluate_loss(vlm, vloader, device, t.precision)
        loss = evaluate_loss(vlm, vloader, device, t.precision, lambda b: step_module(b, 0, 0, standard=True))
        step_module.reshard()  # the root keeps its gathered parameters after a forward
        return loss

    def gathered():
        """(weights, optimizer state) to save: gathered whole from the shards under FSDP (all ranks call it)."""
        return (fsdp.full_state(step_module), fsdp.full_optimizer_state(step_module, opt)) if sharded else (None, opt)

    def record(rec: dict) -> None:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        for k, v in rec.items():
            if k not in ("step", "elapsed_s"):
                tb.add_scalar(k, v, rec["step"])

    def checkpoint(step: int) -> None:
        weights, opt_state = gathered()
        if dist.main:
            save_checkpoint(vlm, cfg, tok, state.step_dir(out, step), {"step": step},
                            extra=state.writer(opt_state, sched, step, run_fp), weights=weights)
            state.rotate(out, t.keep_last)

    t0, running, n_nonfinite = time.time(), [], 0
    micro_iter = iter(loader)
    # the bar is closed (its line ended) also when a stop message follows
    with _sigint_flag() as sigint, tqdm(total=steps, initial=start, desc="train", unit="step",
                                        disable=not dist.main) as bar:
        for step in range(start, steps):
            micro = [next(micro_iter) for _ in range(t.grad_accum)]
            n_global = dist.sum(sum(_n_labels(b) for b in micro))
            loss_sum = 0.0
            for j, batch in enumerate(micro):
                batch = {k: v.to(device) for k, v in batch.items()}
                n = _n_labels(batch)
                sync = dist.world == 1 or sharded or j == len(micro) - 1  # FSDP reduce-scatters every micro-batch
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast(device, t.precision):
                        loss = model(batch, step, steps)
                    # weight by this micro-batch's share of the global batch's labelled tokens, so the
                    # update equals one big batch whatever the split (DDP averages over processes)
                    scaled = loss * (n * dist.world / max(n_global, 1))
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.item() * n
            mean_loss = dist.sum(loss_sum) / max(n_global, 1)
            bad = None if math.isfinite(mean_loss) else "loss"
            if bad is None:
                if scaler:
                    scaler.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
                # a finite loss can still give NaN/inf gradients; the step would write them into the weights
                # (fp16: the loss scaler skips such steps itself)
                bad = None if scaler or math.isfinite(float(norm)) else "gradient"
            if bad:
                if not t.skip_nonfinite:
                    last = state.latest(out)
                    raise PhivlmError(f"non-finite {bad} at step {step + 1}; stopped (last good checkpoint: "
                                      f"{last or 'none'}; lower --lr or use --skip-nonfinite)")
                n_nonfinite += 1
                log.warning("non-finite %s at step %d: batch skipped (%d so far)", bad, step + 1, n_nonfinite)
                opt.zero_grad(set_to_none=True)
                sched.step()
                bar.update(1)
                continue
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            running.append(mean_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if dist.main and (done % t.log_every == 0 or done == steps):
                rec = {"step": done, "loss": sum(running) / len(running), "lr": sched.get_last_lr()[0],
                       "elapsed_s": round(time.time() - t0, 2)}
                if (tf := objective.tf_rate(step, steps)) is not None:
                    rec["tf_rate"] = round(tf, 4)
                record(rec)
                running = []
            if vloader is not None and t.eval_every and done % t.eval_every == 0 and done < steps:
                vloss = validate()
                if dist.main:
                    record({"step": done, "val_loss": vloss})
            stop = done < steps and dist.sum(float(sigint["set"])) > 0  # after the last step: just finish
            if (dist.main or sharded) and done < steps and (stop or (t.save_every and done % t.save_every == 0)):
                checkpoint(done)
            if stop:
                dist.barrier()
                raise Interrupted(f"interrupted at step {done}; resumable checkpoint {state.step_dir(out, done)}"
                                  f" (run the same command again to resume)")
    if vloader is not None:
        vloss = validate()
        if dist.main:
            record({"step": steps, "val_loss": vloss})
            log.info("validation loss %.4f", vloss)
    if n_nonfinite:
        log.warning("%d batches with a non-finite loss were skipped", n_nonfinite)
    weights = fsdp.full_state(step_module) if sharded else None
    if not dist.main:
        dist.barrier()
        return out / "checkpoint"
    logf.close()
    tb.close()
    if skipped:
        with open(out / "skipped.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in skipped)
        log.warning("%d bad samples skipped; see %s", len(skipped), out / "skipped.jsonl")
    ckpt = save_checkpoint(vlm, cfg, tok, out / "checkpoint", {"step": steps, "elapsed_s": time.time() - t0,
                                                               "nonfinite_skipped": n_nonfinite}, weights=weights)
    dist.barrier()
    log.info("checkpoint written to %s (%.0f s)", ckpt, time.time() - t0)
    return ckpt
