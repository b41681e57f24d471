"""The training strategy chosen for ``--fsdp`` and the number of processes, and the run log written by rank 0 alone.
(That each strategy trains like one process is tested in test_scale.py and test_fsdp.py.)"""
from __future__ import annotations

import json
import logging

import torch

from helpers import log_records
from phivlm.config import RunConfig
from phivlm.train.distributed import Dist
from phivlm.train.runlog import RunLog
from phivlm.train.strategy import DDP, FSDP, OneProcess, choose

CPU = torch.device("cpu")


def test_the_strategy_follows_fsdp_and_the_number_of_processes(caplog):
    one = choose("none", Dist(), CPU)
    assert type(one) is OneProcess and one.build_device == CPU and one.validates
    assert type(choose("none", Dist(0, 2), CPU)) is DDP
    assert not choose("none", Dist(1, 2), CPU).validates  # rank 0 alone validates
    sharded = choose("grad-op", Dist(1, 2), torch.device("cuda:1"))
    assert type(sharded) is FSDP and sharded.mode == "grad-op"
    assert sharded.build_device == CPU and sharded.validates  # built whole on the CPU; every rank validates
    with caplog.at_level(logging.WARNING):
        assert type(choose("full", Dist(), CPU)) is OneProcess
    assert "--fsdp full with one process: nothing to shard" in caplog.text


def test_only_rank_0_saves(tmp_path):
    written = []
    for rank in (0, 1):
        choose("none", Dist(rank, 2), CPU).save(lambda weights, opt: written.append((rank, weights, opt)), "opt")
    assert written == [(0, None, "opt")]


def _drop_run_handler():
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "phivlm_run", False)]:
        root.removeHandler(h)
        h.close()


def test_the_run_log_is_written_by_rank_0_alone(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = RunConfig()
    other = RunLog(tmp_path / "other", main=False)
    other.start(cfg)
    other.record({"step": 1, "loss": 2.0})
    other.skipped([{"file": "a", "record": 0, "reason": "bad"}])
    other.close()
    assert not (tmp_path / "other").exists()

    try:
        run = RunLog(tmp_path / "main")
        run.start(cfg)
        run.info("hello %s", "log")
        run.record({"step": 1, "loss": 2.0, "elapsed_s": 0.1})
        run.skipped([{"file": "a", "record": 0, "reason": "bad"}])
        run.close()
    finally:
        _drop_run_handler()
    out = tmp_path / "main"
    assert RunConfig.load(out / "config.yaml") == cfg
    assert log_records(out) == [
        {"step": 1, "loss": 2.0, "elapsed_s": 0.1}]
    assert "hello log" in (out / "train.log").read_text()
    assert json.loads((out / "skipped.jsonl").read_text()) == {"file": "a", "record": 0, "reason": "bad"}
    assert list((out / "tb").glob("events.*"))  # TensorBoard is installed here
