"""Shared fixtures: a per-session model cache and a small synthetic dataset (both built once)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Tiny models run fastest on one thread, and on a busy machine extra OpenMP threads only spin:
# one setting for the whole session (and, through the environment, for the CLI subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(1)

# Built-in tiny models are materialised once per test session into this cache.
os.environ.setdefault("PHIVLM_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict:
    """A small synthetic dataset in the real COCO / LLaVA formats (paths dict from ``synthesize``)."""
    from phivlm.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), n_train=120, n_val=24, seed=0)


def synth_features(root: Path, *sample_files: str, n_train: int = 16, n_val: int = 4) -> dict:
    """A synthetic dataset under ``root / "synth"`` with the features of ``sample_files``' images (keys of the
    dataset, e.g. "instruct_train") cached in fp32 in ``root / "features"``: the paths dict of ``synthesize``
    with ``root`` and ``features`` added."""
    from phivlm.data.features import build_features
    from phivlm.data.sources import load_samples
    from phivlm.data.synth import synthesize
    from phivlm.models.vision import VisionTower

    d = synthesize(root / "synth", n_train=n_train, n_val=n_val, seed=0)
    names = [s.image for f in sample_files for s in load_samples(d[f])]
    build_features(VisionTower("tiny-clip"), d["images"], names, root / "features", precision="fp32")
    return {**d, "root": root, "features": root / "features"}


@pytest.fixture(scope="session")
def cached_synth():
    """``cached_synth(root, *sample_files, n_train=16, n_val=4)`` -> a synthetic dataset with its features cached."""
    return synth_features


def untrained_checkpoint(out: Path, lm: str = "tiny-phi", *, cfg=None, seed: int | None = None, change=None) -> Path:
    """An untrained checkpoint ``out / "checkpoint"`` of ``cfg``, by default the stage-1 defaults with tiny-clip and
    ``lm``: a random projector and separator (after ``torch.manual_seed(seed)``; None: from the RNG as it is), the
    feature statistics not fitted; ``change(vlm)`` may alter the weights before they are saved."""
    from phivlm.config import stage_defaults
    from phivlm.loading.checkpoint import build_vlm
    from phivlm.models.vision import build_tower
    from phivlm.train.checkpoint import save_checkpoint

    if cfg is None:
        cfg = stage_defaults("pretrain")
        cfg.model.vision, cfg.model.lm = "tiny-clip", lm
    tower = build_tower(cfg.model)
    if seed is not None:
        torch.manual_seed(seed)
    vlm, tok = build_vlm(cfg, tower.hidden_size, tower.num_patches, torch.device("cpu"))
    if change is not None:
        with torch.no_grad():
            change(vlm)
    return save_checkpoint(vlm, cfg, tok, out / "checkpoint")


@pytest.fixture(scope="session")
def untrained():
    """``untrained(out, lm="tiny-phi", cfg=None, seed=None, change=None)`` -> an untrained checkpoint folder."""
    return untrained_checkpoint


@pytest.fixture(scope="session")
def tiny_tower():
    from phivlm.models.vision import VisionTower

    return VisionTower("tiny-clip")


@pytest.fixture(scope="session")
def tiny_tok():
    from phivlm.models.lm import load_tokenizer

    return {name: load_tokenizer(name) for name in ("tiny-phi", "tiny-llama")}


# -- trained tiny checkpoints shared by test_tuning / test_reload / test_learnability -------------

def tiny_run_config(out: Path, data: str, images: str, features: Path, lm: str = "tiny-phi", **train):
    """A RunConfig for tiny-clip + ``lm`` on CPU in fp32; ``train`` overrides TrainConfig fields."""
    from phivlm.config import RunConfig

    cfg = RunConfig()
    cfg.model.vision, cfg.model.lm = "tiny-clip", lm
    cfg.data.data, cfg.data.images, cfg.data.features = data, images, str(features)
    cfg.data.template = "plain"
    cfg.train.output, cfg.train.device, cfg.train.precision = str(out), "cpu", "fp32"
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.log_every = 4, 3, 1
    for k, v in train.items():
        assert hasattr(cfg.train, k), f"no TrainConfig field {k!r}"
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(out, data, images, features, lm="tiny-phi", **train_fields)`` -> RunConfig."""
    return tiny_run_config


@dataclass
class TrainedRun:
    ckpt: Path  # the checkpoint folder train() wrote
    vlm: object  # the in-memory model as training left it (not reloaded)
    towers: list = field(default_factory=list)  # every VisionTower that train() built


@pytest.fixture(scope="session")
def train_run():
    """``run(cfg, init)``: ``phivlm.train.loop.train`` capturing the in-memory model and vision towers."""
    from phivlm.train import loop

    def run(cfg, init: Path | None = None) -> TrainedRun:
        towers: list = []
        saved: dict = {}
        real_save, real_build = loop.save_checkpoint, loop.build_tower

        def build_tower(*args, **kwargs):
            towers.append(real_build(*args, **kwargs))
            return towers[-1]

        def save(vlm, *args, **kwargs):
            saved["vlm"] = vlm
            return real_save(vlm, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop, "build_tower", build_tower)
            mp.setattr(loop, "save_checkpoint", save)
            ckpt = loop.train(cfg, init=init)
        return TrainedRun(ckpt, saved["vlm"], towers)

    return run


@pytest.fixture(scope="session")
def stage1_phi(synth_data, train_run, tmp_path_factory) -> TrainedRun:
    """Stage 1 (projector + separator on captions, LM frozen): tiny-clip + tiny-phi, 3 steps."""
    root = tmp_path_factory.mktemp("stage1-phi")
    cfg = tiny_run_config(root / "run", synth_data["captions_train"], synth_data["images"], root / "features")
    return train_run(cfg)


def colour_conversations(instruct: str | Path, out: Path) -> Path:
    """The colour turns of LLaVA conversations, one single-turn conversation each (same LLaVA format)."""
    records = json.loads(Path(instruct).read_text())
    kept = []
    for rec in records:
        conv = rec["conversations"]
        for i, kind in enumerate(rec["types"]):
            if kind == "color":
                q = conv[2 * i]["value"].replace("<image>", "").strip()
                kept.append({"id": f"{rec['id']}_{i}", "image": rec["image"], "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": conv[2 * i + 1]["value"]}]})
    out.write_text(json.dumps(kept))
    return out


# Learnability recipe (see tests/test_learnability.py): the stage-1 LM is random and frozen, so stage 1
# can only learn an image-independent soft prompt and is kept short; stage 2 tunes the LM fully.
LEARN = dict(n_train=800, n_val=100, s1_steps=10, s2_steps=300, batch=32, lr=3e-3)


@pytest.fixture(scope="session")
def learned(train_run, tmp_path_factory) -> dict:
    """Stage 1 + stage 2 (full tuning, ``auto`` template = ChatML) of tiny-clip + tiny-llama on synthetic
    colour questions; a model that answers from the image (checked in test_learnability)."""
    from phivlm.data.synth import synthesize

    root = tmp_path_factory.mktemp("learned")
    data = synthesize(root / "data", n_train=LEARN["n_train"], n_val=LEARN["n_val"], seed=0)
    s1 = tiny_run_config(root / "stage1", data["captions_train"], data["images"], root / "features", lm="tiny-llama",
                         max_steps=LEARN["s1_steps"], batch_size=LEARN["batch"], lr=1e-3, log_every=5)
    stage1 = train_run(s1)
    s2 = tiny_run_config(root / "stage2", str(colour_conversations(data["instruct_train"], root / "colour.json")),
                         data["images"], root / "features", lm="tiny-llama", max_steps=LEARN["s2_steps"],
                         batch_size=LEARN["batch"], lr=LEARN["lr"], lm_lr=LEARN["lr"], log_every=25)
    s2.data.template, s2.tuning.lm_tuning = "auto", "full"
    return {"data": data, "stage1": stage1, "stage2": train_run(s2, init=stage1.ckpt)}


@pytest.fixture(scope="session")
def learned_eval(learned, tmp_path_factory) -> dict:
    """``phivlm eval`` of the ``learned`` stage-2 checkpoint on the held-out colour questions, with the blind
    and shuffled-image baselines: ``{"out", "metrics", "predictions", "questions"}`` (one eval run, shared)."""
    from phivlm.cli import main

    data = learned["data"]
    root = tmp_path_factory.mktemp("learned-eval")
    rows = [json.loads(line) for line in Path(data["qa_val"]).read_text().splitlines() if line.strip()]
    questions = root / "colour_val.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows if r["type"] == "color"))
    out = root / "eval"
    assert main(["eval", "--checkpoint", str(learned["stage2"].ckpt), "--data", str(questions), "--images",
                 data["images"], "--out", str(out), "--device", "cpu"]) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text()), "predictions": predictions,
            "questions": questions}


@pytest.fixture(scope="session")
def tiny_checkpoint(synth_data, tmp_path_factory) -> Path:
    """A chat-template checkpoint (tiny-clip + tiny-llama, projector trained two steps)."""
    from phivlm.config import RunConfig
    from phivlm.train.loop import train

    out = tmp_path_factory.mktemp("serve")
    cfg = RunConfig()
    cfg.model.vision, cfg.model.lm = "tiny-clip", "tiny-llama"
    cfg.data.data, cfg.data.images, cfg.data.template = synth_data["instruct_train"], synth_data["images"], "auto"
    cfg.data.features, cfg.data.limit = str(out / "features"), 8
    cfg.train.output, cfg.train.max_steps, cfg.train.batch_size = str(out / "run"), 2, 4
    return train(cfg)
