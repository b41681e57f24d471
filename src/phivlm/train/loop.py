"""The training loop shared by stage 1 (pretrain) and stage 2 (finetune)."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from ..config import RunConfig
from ..data.dataset import Collator, VLMDataset
from ..data.features import FeatureStore, build_features
from ..data.sources import load_samples
from ..data.templates import check_template_name, get_template, image_slots, resolve_template_name
from ..models.vision import VisionTower, build_tower
from ..models.vlm import PhiVLM
from ..errors import Interrupted, PhivlmError
from ..loading.checkpoint import build_vlm, resolve_checkpoint
from ..runtime import autocast, compute_dtype, pick_device, seed_everything
from . import distributed, state
from .distributed import Dist
from .checkpoint import save_checkpoint
from .compiling import compile_layers
from .objectives import build_objective
from .runlog import RunLog
from .sampler import StepBatches
from .strategy import OneProcess, choose as choose_strategy

log = logging.getLogger(__name__)


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
    slots = image_slots(tok, tower.num_patches, tower.tiles, cfg.model.tile_markers)
    ds = VLMDataset(samples, template, tok, slots, cfg.data.max_length, cfg.data.skip_bad,
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


def _resume_dir(cfg: RunConfig, out: Path, run_fp: dict[str, str]) -> Path | None:
    """The checkpoint to resume from, or None; one found by ``--resume auto`` must be of this run (``run_fp``)."""
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        folder = state.latest(out)
        if folder is not None:
            state.check_same_run(folder, run_fp)
    else:
        folder = resolve_checkpoint(cfg.train.resume)
        if not (folder / state.TRAINER_FILE).is_file():
            raise PhivlmError(f"{folder}: not a resumable checkpoint ({state.TRAINER_FILE} missing)")
    if folder is not None:
        log.info("resuming from %s", folder)
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




def _model_and_data(cfg: RunConfig, init: Path | None, build_on: torch.device, device: torch.device, dist: Dist):
    """(vlm, tok, training data, validation data or None, skipped samples); data: (dataset, feature store). The
    model comes from checkpoint ``init`` where given, built on ``build_on``. Resolves the run's template, and
    after full tuning its base LM, in ``cfg``."""
    tower = build_tower(cfg.model)
    vlm, tok = build_vlm(cfg, tower.hidden_size, tower.num_patches, build_on, init, computes_on=device)
    cfg.data.template = resolve_template_name(cfg.data.template, tok)
    template = get_template(cfg.data.template)
    if init is not None and (init / "lm").is_dir():
        cfg.model.lm = str(init / "lm")  # an earlier full-tuned LM is the base from now on
    skipped: list[dict] = []
    data = load_data(cfg, tower, cfg.data.data, template, tok, device, skipped, dist)
    val = load_data(cfg, tower, cfg.data.val_data, template, tok, device, skipped, dist) if cfg.data.val_data else None
    if init is None:  # a new projector: its input statistics come from this run's data
        fit_feature_norm(vlm, *data)
    return vlm, tok, data, val, skipped


def _loaders(cfg: RunConfig, data, val, tok, batches: StepBatches, start: int, steps: int):
    """(training loader of steps ``start``..``steps``, validation loader or None); data: (dataset, feature store)."""
    t = cfg.train
    # its own generator: iterating must not draw from the global RNG just restored (dropout would shift)
    loader = DataLoader(data[0], batch_sampler=_MicroBatches(batches, start, steps), num_workers=t.workers,
                        collate_fn=Collator(data[1], tok.pad_token_id), generator=torch.Generator().manual_seed(t.seed))
    vloader = None if val is None else DataLoader(val[0], batch_size=t.batch_size,
                                                  collate_fn=Collator(val[1], tok.pad_token_id))
    return loader, vloader


def _step_record(step: int, losses: list[float], lr: float, t0: float, tf_rate: float | None) -> dict:
    """A line of ``log.jsonl``: the mean loss since the last one."""
    rec = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "elapsed_s": round(time.time() - t0, 2)}
    if tf_rate is not None:
        rec["tf_rate"] = round(tf_rate, 4)
    return rec


class _Update:
    """Gradients of a global batch and the optimizer step: AdamW, warm-up then cosine or constant, fp16 loss
    scaling, gradient clipping; a step whose loss or gradient is not finite is skipped."""

    def __init__(self, vlm: PhiVLM, cfg: RunConfig, steps: int, strategy: OneProcess, device: torch.device):
        t = cfg.train
        self.params = [p for g in param_groups(vlm, cfg) for p in g["params"]]
        self.opt = torch.optim.AdamW(param_groups(vlm, cfg), weight_decay=t.weight_decay)
        warmup = int(t.warmup_ratio * steps)
        self.sched = (get_constant_schedule_with_warmup(self.opt, warmup) if t.lr_schedule == "constant"
                      else get_cosine_schedule_with_warmup(self.opt, warmup, steps))
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.strategy, self.device, self.precision, self.grad_clip = strategy, device, t.precision, t.grad_clip

    def gradients(self, model: nn.Module, micro: list[dict], step: int, steps: int) -> float:
        """Forward and backward over this rank's micro-batches of a global batch; returns the batch's mean loss."""
        dist = self.strategy.dist
        n_global = dist.sum(sum(_n_labels(b) for b in micro))
        loss_sum = 0.0
        for j, batch in enumerate(micro):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            n = _n_labels(batch)
            with self.strategy.accumulating(last=j == len(micro) - 1):
                with autocast(self.device, self.precision):
                    loss = model(batch, step, steps)
                # weight by this micro-batch's share of the global batch's labelled tokens, so the
                # update equals one big batch whatever the split (DDP averages over processes)
                scaled = loss * (n * dist.world / max(n_global, 1))
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item() * n
        return dist.sum(loss_sum) / max(n_global, 1)

    def apply(self, mean_loss: float) -> str | None:
        """The optimizer and scheduler step; returns what was not finite ("loss" or "gradient", the step skipped)."""
        bad = None if math.isfinite(mean_loss) else "loss"
        if bad is None:
            if self.scaler:
                self.scaler.unscale_(self.opt)
            norm = self.strategy.clip_grad_norm(self.params, self.grad_clip)
            # a finite loss can still give NaN/inf gradients; the step would write them into the weights
            # (fp16: the loss scaler skips such steps itself)
            bad = None if self.scaler or math.isfinite(norm) else "gradient"
        if bad is None and self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        elif bad is None:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return bad


def train(cfg: RunConfig, init: Path | None = None) -> Path:
    """Train per ``cfg`` (from checkpoint ``init`` if given); returns the final checkpoint folder.

    Under torchrun each process trains its share of every global batch (DDP, or FSDP with ``--fsdp``); rank 0
    alone writes logs and checkpoints. Resumes from the latest periodic checkpoint in the output folder.
    ``cfg`` is left as given: the run resolves its template and LM on its own copy.
    """
    cfg = copy.deepcopy(cfg)
    cfg.validate()  # a bad value fails before anything is loaded or written
    dist, device_name = distributed.init(cfg.train.device)
    runlog = RunLog(cfg.train.output, dist.main)
    out, device, t = runlog.out, pick_device(device_name), cfg.train
    run_fp = state.fingerprint(cfg, init, dist.world)
    resume = _resume_dir(cfg, out, run_fp)
    init = resume or init
    seed_everything(t.seed)
    check_template_name(cfg.data.template)  # fail on a bad name before any loading
    strategy = choose_strategy(t.fsdp, dist, device)
    objective = build_objective(t)
    vlm, tok, (ds, store), val, skipped = _model_and_data(cfg, init, strategy.build_device, device, dist)
    runlog.start(cfg)
    batches = StepBatches(ds.lengths(), t.batch_size, t.seed, dist.world, dist.rank, t.grad_accum,
                          t.group_by_length)
    steps = t.max_steps or max(1, math.ceil(t.epochs * batches.steps_per_epoch))
    vlm.prepare_training(compute_dtype(device, t.precision) if strategy.holds_frozen_weights else None)
    if t.compile:
        compile_layers(vlm.base_lm, device)
    model = strategy.wrap(_Step(vlm, objective))
    update = _Update(vlm, cfg, steps, strategy, device)
    start = 0 if resume is None else state.restore(resume, update.opt, update.sched,
                                                   lambda osd: strategy.load_optimizer(update.opt, osd))
    loader, vloader = _loaders(cfg, (ds, store), val if strategy.validates else None, tok, batches, start, steps)
    runlog.info("training steps %d..%d on %d samples (%d skipped), global batch %d (%d x %d procs x %d accum), "
                "padding %.1f%%; %.2fM trainable parameters; %s, %s", start + 1, steps, len(ds), len(skipped),
                batches.global_size, t.batch_size, dist.world, t.grad_accum, 100 * batches.padding_fraction(),
                sum(p.numel() for p in update.params) / 1e6, device, t.precision)

    def validate(step: int) -> float:
        with strategy.evaluating() as forward:
            loss = evaluate_loss(vlm, vloader, device, t.precision, forward)
        runlog.record({"step": step, "val_loss": loss})
        return loss

    def save_step(step: int) -> None:  # a resumable checkpoint
        def write(weights, opt_state):
            save_checkpoint(vlm, cfg, tok, state.step_dir(out, step), {"step": step},
                            extra=state.writer(opt_state, update.sched, step, run_fp), weights=weights)
            state.rotate(out, t.keep_last)

        strategy.save(write, update.opt)

    vlm.train()
    t0, running, n_nonfinite = time.time(), [], 0
    micro_iter = iter(loader)
    # the bar is closed (its line ended) also when a stop message follows
    with _sigint_flag() as sigint, runlog.progress(steps, start) as bar:
        for step in range(start, steps):
            mean_loss = update.gradients(model, [next(micro_iter) for _ in range(t.grad_accum)], step, steps)
            bad = update.apply(mean_loss)
            if bad and not t.skip_nonfinite:
                raise PhivlmError(f"non-finite {bad} at step {step + 1}; stopped (last good checkpoint: "
                                  f"{state.latest(out) or 'none'}; lower --lr or use --skip-nonfinite)")
            bar.update(1)
            if bad:
                n_nonfinite += 1
                log.warning("non-finite %s at step %d: batch skipped (%d so far)", bad, step + 1, n_nonfinite)
                continue
            done = step + 1
            running.append(mean_loss)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if done % t.log_every == 0 or done == steps:
                runlog.record(_step_record(done, running, update.sched.get_last_lr()[0], t0,
                                           objective.tf_rate(step, steps)))
                running = []
            if vloader is not None and t.eval_every and done % t.eval_every == 0 and done < steps:
                validate(done)
            stop = done < steps and dist.sum(float(sigint["set"])) > 0  # after the last step: just finish
            if done < steps and (stop or (t.save_every and done % t.save_every == 0)):
                save_step(done)
            if stop:
                dist.barrier()
                raise Interrupted(f"interrupted at step {done}; resumable checkpoint {state.step_dir(out, done)}"
                                  f" (run the same command again to resume)")
    if vloader is not None:
        runlog.info("validation loss %.4f", validate(steps))
    if n_nonfinite:
        log.warning("%d batches with a non-finite loss were skipped", n_nonfinite)
    runlog.close()
    runlog.skipped(skipped)
    strategy.save(lambda weights, _: save_checkpoint(vlm, cfg, tok, out / "checkpoint", {
        "step": steps, "elapsed_s": time.time() - t0, "nonfinite_skipped": n_nonfinite}, weights=weights))
    dist.barrier()
    runlog.info("checkpoint written to %s (%.0f s)", out / "checkpoint", time.time() - t0)
    return out / "checkpoint"
