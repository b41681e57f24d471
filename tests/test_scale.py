"""Scale out and survive: DDP and gradient accumulation equal one big batch, exact resume after SIGKILL
(also mid-checkpoint), SIGINT stops with a resumable checkpoint, non-finite losses, length-grouped batches.

Runs that must die are real processes (the CLI in a subprocess, through a wrapper that patches
``phivlm.train.state`` to SIGKILL itself at a chosen point); the others run in-process."""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import log_records, max_diff, run_cli, start_cli, weights
from phivlm.cli import build_parser, main
from phivlm.config import config_from_args, stage_defaults
from phivlm.errors import PhivlmError
from phivlm.train import loop, state
from phivlm.train.sampler import StepBatches

# Run by a subprocess: the CLI, SIGKILLed right after the step-N checkpoint ("after-checkpoint") or
# half-way through writing it ("while-writing"). argv: mode N cli-args...
WRAPPER = '''
import os, signal, sys
from pathlib import Path
from phivlm.cli import main
from phivlm.train import state

mode, kill_step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "after-checkpoint":
    rotate = state.rotate
    def patched_rotate(output, keep):
        if state.latest(Path(output)).name == f"step-{kill_step:07d}":
            die()
        rotate(output, keep)
    state.rotate = patched_rotate
else:
    writer = state.writer
    def patched_writer(opt, sched, step, *rest):
        write = writer(opt, sched, step, *rest)
        def partial_write(folder):
            write(folder)
            if step == kill_step:
                data = (folder / state.TRAINER_FILE).read_bytes()
                (folder / state.TRAINER_FILE).write_bytes(data[: len(data) // 2])
                die()
        return partial_write
    state.writer = patched_writer
sys.exit(main(argv))
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory, cached_synth, untrained) -> dict:
    """16 synthetic images with their features cached, and an (untrained) stage-1 checkpoint."""
    root = tmp_path_factory.mktemp("scale")
    d = cached_synth(root, "captions_train", "instruct_train")
    wrapper = root / "kill_wrapper.py"
    wrapper.write_text(WRAPPER)
    return {**d, "stage1": untrained(root / "stage1", seed=0), "wrapper": wrapper}


def finetune_args(data: dict, out: Path, *extra) -> list[str]:
    """Stage-2 LoRA on the synthetic conversations (16 samples), fp32."""
    args = ["finetune", "--checkpoint", data["stage1"], "--data", data["instruct_train"], "--images", data["images"],
            "--features", data["features"], "--output", out, "--precision", "fp32", "--workers", "0",
            "--lora-rank", "4", *extra]
    return [str(a) for a in args]


# 100 steps (25 epochs), dropout on (so the RNG state must be restored), a periodic checkpoint every 20
RESUMABLE = ("--max-steps", "100", "--batch-size", "4", "--lora-dropout", "0.2", "--lr", "3e-3", "--lm-lr", "3e-3",
             "--save-every", "20", "--keep-last", "2", "--log-every", "10")


def run(argv: list[str]) -> None:
    assert main(argv) == 0


def kill_run(data: dict, mode: str, step: int, argv: list[str]) -> None:
    run_cli(mode, step, *argv, program=(data["wrapper"],), returncode=-signal.SIGKILL)


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and any(k.startswith("adapter.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max diff {(wa[k] - wb[k]).abs().max().item():.3g}"


def steps_on_disk(out: Path) -> list[str]:
    return [p.name for p in state.step_dirs(out)]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in log_records(out) if "loss" in r]


# -- one big batch, however it is split ----------------------------------------------------------------------

# Splitting the batch changes float32 summation order: losses agree to a few ulps (relative 1e-6), and Adam, which
# rescales every gradient entry, turns that noise in near-zero entries into weight steps of up to ~lr. So lr stays
# small enough for the 1e-5 weight tolerance (50x below the smallest weight movement assert_moved asks for) and the
# stage-1 checkpoint is seeded; weighting the micro-batches equally instead of by labelled tokens moves them ~3e-3
# apart
TOL = 1e-5
SPLIT = ("--max-steps", "3", "--lora-dropout", "0", "--lr", "1e-3", "--lm-lr", "1e-3", "--log-every", "1")


def assert_moved(ckpt: Path, stage1: Path) -> None:
    w, w0 = weights(ckpt), load_file(str(stage1 / "projector.safetensors"))
    assert min((w[k] - w0[k]).abs().max().item() for k in w0 if not k.startswith("feature_norm.")) > 5e-4  # fixed stats
    assert min(v.abs().max().item() for k, v in w.items() if "lora_B" in k) > 5e-4  # LoRA B starts at zero


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(data, tmp_path):
    ddp = run_cli(*finetune_args(data, tmp_path / "ddp", "--nproc", "2", "--batch-size", "4", *SPLIT))
    assert "global batch 8 (4 x 2 procs x 1 accum)" in ddp.stderr
    run(finetune_args(data, tmp_path / "one", "--batch-size", "8", *SPLIT))
    assert_moved(tmp_path / "one" / "checkpoint", data["stage1"])
    assert max_diff(tmp_path / "ddp" / "checkpoint", tmp_path / "one" / "checkpoint") < TOL
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    assert len(losses(tmp_path / "ddp")) == 3


@pytest.mark.slow
def test_ddp_ranks_encode_their_share_of_an_empty_cache(data, tmp_path):
    """No rank waits on another's encoding: each writes its own shards; together they hold every image."""
    from phivlm.data.features import FeatureStore
    from phivlm.data.images import open_rgb
    from phivlm.models.vision import VisionTower

    feats = tmp_path / "features"
    argv = finetune_args(data, tmp_path / "ddp", "--nproc", "2", "--batch-size", "4", "--max-steps", "1")
    argv[argv.index("--features") + 1] = str(feats)
    run_cli(*argv)
    (folder,) = feats.iterdir()
    writers = {p.stem.split("-")[1] for p in folder.glob("shard_*.json")}
    assert len(writers) == 2  # two processes wrote shards
    store = FeatureStore(folder)
    names = sorted(store.index)
    assert len(names) == 16
    tower = VisionTower("tiny-clip")
    expect = tower(tower.preprocess([open_rgb(Path(data["images"]) / n) for n in names]))
    torch.testing.assert_close(store.get(names), expect, rtol=1e-3, atol=1e-4)


def test_gradient_accumulation_equals_one_batch(data, tmp_path):
    run(finetune_args(data, tmp_path / "accum", "--batch-size", "2", "--grad-accum", "4", *SPLIT))
    run(finetune_args(data, tmp_path / "one", "--batch-size", "8", *SPLIT))
    assert_moved(tmp_path / "one" / "checkpoint", data["stage1"])
    assert max_diff(tmp_path / "accum" / "checkpoint", tmp_path / "one" / "checkpoint") < TOL
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)


# -- exact resume -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(data) -> Path:
    """The reference: 100 steps without interruption."""
    out = data["root"] / "straight"
    run(finetune_args(data, out, *RESUMABLE))
    return out


@pytest.fixture(scope="module")
def killed_at_60(data) -> Path:
    """The same run, SIGKILLed right after writing its step-60 checkpoint."""
    out = data["root"] / "killed60"
    kill_run(data, "after-checkpoint", 60, finetune_args(data, out, *RESUMABLE))
    assert not (out / "checkpoint").exists()
    assert steps_on_disk(out) == ["step-0000020", "step-0000040", "step-0000060"]  # killed before rotating
    return out


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(data, straight, killed_at_60, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(killed_at_60, out)
    assert_bitwise_equal(straight / "checkpoints" / "step-0000060", out / "checkpoints" / "step-0000060")
    caplog.set_level("INFO")
    run(finetune_args(data, out, *RESUMABLE))  # the same command: resumes from the latest checkpoint
    assert f"resuming from {out / 'checkpoints' / 'step-0000060'}" in caplog.text
    assert "training steps 61..100" in caplog.text
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 100
    assert steps_on_disk(out) == ["step-0000060", "step-0000080"]  # --keep-last 2
    assert_bitwise_equal(out / "checkpoint", straight / "checkpoint")


@pytest.mark.slow
def test_auto_resume_refuses_another_run(data, killed_at_60, tmp_path, capsys):
    """A new run in a folder holding another run's checkpoints (fewer steps, other data) is refused in one line
    naming what differs, instead of continuing the old run (or saving its weights under the new config)."""
    out = tmp_path / "run"
    shutil.copytree(killed_at_60, out)
    assert main(finetune_args(data, out, *RESUMABLE, "--max-steps", "50")) == 2
    err = capsys.readouterr().err
    assert "holds a resumable run with other settings or data (train.max_steps)" in err and "--resume none" in err
    assert "Traceback" not in err
    assert main(finetune_args(data, out, *RESUMABLE, "--limit", "8")) == 2
    assert "(data.limit)" in capsys.readouterr().err
    assert not (out / "checkpoint").exists()  # nothing trained, nothing saved
    run(finetune_args(data, out, *RESUMABLE, "--max-steps", "2", "--resume", "none"))  # starting over is allowed
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_leaves_the_last_complete_one(data, straight, killed_at_60, tmp_path,
                                                                     caplog):
    out = tmp_path / "run"
    shutil.copytree(killed_at_60, out)
    kill_run(data, "while-writing", 80, finetune_args(data, out, *RESUMABLE))  # resumes at 60, dies writing 80
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-0000080")]
    assert leftovers, "the partial step-80 checkpoint should be in a temporary folder"
    assert state.latest(out) == out / "checkpoints" / "step-0000060"
    caplog.set_level("INFO")
    run(finetune_args(data, out, *RESUMABLE))
    assert f"resuming from {out / 'checkpoints' / 'step-0000060'}" in caplog.text
    assert_bitwise_equal(out / "checkpoint", straight / "checkpoint")
    assert not [p for p in (out / "checkpoints").iterdir() if not state.STEP_DIR.match(p.name)]  # cleaned up


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint_and_exits_130(data, straight, tmp_path, caplog):
    out = tmp_path / "run"
    argv = finetune_args(data, out, *RESUMABLE)
    with open(tmp_path / "stderr", "w+") as err:
        p = start_cli(*argv, stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-0000020").is_dir() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=120)
        err.seek(0)
        stderr = err.read()
    assert rc == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    messages = [line for line in stderr.splitlines() if line.startswith("phivlm:")]
    assert len(messages) == 1 and messages[0].startswith("phivlm: stopped: interrupted at step "), messages
    step = int(messages[0].split("interrupted at step ")[1].split(";")[0])
    assert 20 < step < 100
    folder = out / "checkpoints" / f"step-{step:07d}"
    assert str(folder) in messages[0] and state.latest(out) == folder
    assert not (out / "checkpoint").exists()
    caplog.set_level("INFO")
    run(argv)
    assert f"resuming from {folder}" in caplog.text
    assert_bitwise_equal(out / "checkpoint", straight / "checkpoint")


# -- non-finite losses --------------------------------------------------------------------------------------

class NanAt:
    """Wraps an objective: the loss of 0-based step ``step`` is NaN."""

    def __init__(self, objective, step: int):
        self.objective, self.step = objective, step

    def __call__(self, vlm, batch, step, steps):
        loss = self.objective(vlm, batch, step, steps)
        return loss * float("nan") if step == self.step else loss

    def tf_rate(self, step, steps):
        return self.objective.tf_rate(step, steps)


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NanGradAt(NanAt):
    """Wraps an objective: the loss of 0-based step ``step`` is finite but its gradients are NaN."""

    def __call__(self, vlm, batch, step, steps):
        loss = self.objective(vlm, batch, step, steps)
        return _NanGrad.apply(loss) if step == self.step else loss


def pretrain_config(data: dict, out: Path, *extra):
    args = build_parser().parse_args([str(a) for a in (
        "pretrain", "--data", data["captions_train"], "--images", data["images"], "--features", data["features"],
        "--vision", "tiny-clip", "--lm", "tiny-phi", "--output", out, "--precision", "fp32", "--batch-size", "4",
        "--max-steps", "8", "--save-every", "2", "--log-every", "1", *extra)])
    return config_from_args(args, stage_defaults("pretrain"))


NON_FINITE = [(NanAt, "loss"), (NanGradAt, "gradient")]  # a NaN loss; a finite loss with NaN gradients


@pytest.mark.parametrize("wrap,what", NON_FINITE)
def test_non_finite_stops_naming_the_last_good_checkpoint(data, tmp_path, monkeypatch, wrap, what):
    build = loop.build_objective
    monkeypatch.setattr(loop, "build_objective", lambda t: wrap(build(t), 4))
    with pytest.raises(PhivlmError, match=f"non-finite {what} at step 5") as e:
        loop.train(pretrain_config(data, tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert str(last) in str(e.value)
    assert "\n" not in str(e.value)
    assert all(torch.isfinite(v).all() for v in weights(last).values())


@pytest.mark.parametrize("wrap,what", NON_FINITE)
def test_skip_nonfinite_finishes_and_counts_the_skipped_batches(data, tmp_path, monkeypatch, wrap, what):
    build = loop.build_objective
    monkeypatch.setattr(loop, "build_objective", lambda t: wrap(build(t), 4))
    ckpt = loop.train(pretrain_config(data, tmp_path / "run", "--skip-nonfinite"))
    assert json.loads((ckpt / "state.json").read_text())["nonfinite_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in weights(ckpt).values())
    assert len(losses(tmp_path / "run")) == 7  # every step but the skipped one logged a finite loss


# -- batching -----------------------------------------------------------------------------------------------

def varied_lengths(n: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(5, 200) for _ in range(n)]


@pytest.mark.parametrize("group", [False, True])
def test_every_sample_once_per_epoch_and_ranks_partition_the_global_batch(group):
    lengths = varied_lengths(96)
    world, accum, bs = 2, 3, 4  # global batch 24: 4 steps per epoch
    ranks = [StepBatches(lengths, bs, 7, world, r, accum, group) for r in range(world)]
    one = StepBatches(lengths, bs * world, 7, 1, 0, accum, group)  # 1 process, the same global batch
    assert ranks[0].steps_per_epoch == 4
    for epoch in range(3):
        seen = []
        for step in range(epoch * 4, epoch * 4 + 4):
            micro = [m for b in ranks for m in b.micro_batches(step)]
            assert len(micro) == world * accum and all(len(m) == bs for m in micro)
            flat = [i for m in micro for i in m]
            assert len(set(flat)) == len(flat)  # the ranks' micro-batches are disjoint ...
            assert sorted(flat) == sorted(ranks[0].global_batches(epoch)[step % 4])  # ... and make the global batch
            assert sorted(flat) == sorted(i for m in one.micro_batches(step) for i in m)
            assert StepBatches(lengths, bs, 7, world, 1, accum, group).micro_batches(step) == \
                ranks[1].micro_batches(step)  # a fresh sampler (resume) gives the same batches
            seen += flat
        assert sorted(seen) == list(range(96))
    assert ranks[0].global_batches(0) != ranks[0].global_batches(1)  # reshuffled every epoch


def test_incomplete_last_batch_is_dropped_without_repeats():
    b = StepBatches(varied_lengths(50), 4, 0, 2, 0, 1, True)  # global batch 8: 6 steps, 2 samples left over
    flat = [i for batch in b.global_batches(0) for i in batch]
    assert b.steps_per_epoch == 6 and len(flat) == 48 == len(set(flat))


def test_grouping_by_length_reduces_padding():
    lengths = varied_lengths(512)
    plain = StepBatches(lengths, 4, 0, 2, 0, 2, False).padding_fraction()
    grouped = StepBatches(lengths, 4, 0, 2, 0, 2, True).padding_fraction()
    assert grouped < plain / 3, (grouped, plain)


def test_a_global_batch_larger_than_the_data_is_a_clear_error():
    with pytest.raises(PhivlmError, match="10 samples < one global batch of 16"):
        StepBatches([5] * 10, 4, 0, 2, 0, 2)
