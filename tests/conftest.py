"""Shared fixtures: a per-session model cache and a small synthetic dataset (both built once)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Built-in tiny models are materialised once per test session into this cache.
os.environ.setdefault("PHIVLM_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict:
    """A small synthetic dataset in the real COCO / LLaVA formats (paths dict from ``synthesize``)."""
    from phivlm.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), n_train=120, n_val=24, seed=0)


@pytest.fixture(scope="session")
def tiny_tower():
    from phivlm.models.vision import VisionTower

    return VisionTower("tiny-clip")


@pytest.fixture(scope="session")
def tiny_tok():
    from phivlm.models.lm import load_tokenizer

    return {name: load_tokenizer(name) for name in ("tiny-phi", "tiny-llama")}
