"""--lr-schedule: after warm-up the learning rate decays to zero (cosine) or stays (constant)."""
from __future__ import annotations

import pytest

from helpers import log_records
from phivlm.train.loop import train


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_after_warm_up(schedule, synth_data, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run", synth_data["captions_train"], synth_data["images"], tmp_path / "features",
                      max_steps=5, lr=1e-3, warmup_ratio=0.2, lr_schedule=schedule)
    train(cfg)
    lrs = [r["lr"] for r in log_records(tmp_path / "run") if "lr" in r]
    assert len(lrs) == 5 and lrs[0] == pytest.approx(1e-3)  # warm-up: 1 step
    if schedule == "constant":
        assert lrs == pytest.approx([1e-3] * 5)
    else:
        assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
