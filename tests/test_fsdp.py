"""FSDP (``--fsdp full|grad-op``, torch FSDP2) on the CPU: 2 gloo processes under torchrun train like one process on
the same global batch, write checkpoints in the single-process format (they answer and finetune in one process),
and resume under FSDP or in one process as if never stopped; combinations FSDP cannot train are refused.

Cases: ``full`` shards tiny-llama (tied embeddings) fully tuned with gradient checkpointing; ``grad-op`` shards
tiny-phi with LoRA (frozen base weights). The FSDP runs are real processes (the CLI with ``--nproc 2``); the
one-process references run in-process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import first_logits, log_records, max_diff, run_cli, weights
from phivlm.cli import main
from phivlm.data.images import open_rgb
from phivlm.infer import Assistant
from phivlm.train import state

CASES = {  # mode: (LM, finetune flags)
    "full": ("tiny-llama", ("--lm-tuning", "full", "--gradient-checkpointing")),
    "grad-op": ("tiny-phi", ("--lm-tuning", "lora", "--lora-rank", "4", "--lora-dropout", "0")),
}
# 4 steps with a resumable checkpoint at step 2 and validation at steps 2 and 4. Adam turns float noise in
# near-zero gradient entries (FSDP sums gradients in another order) into weight differences of up to ~lr: the
# weights agree to ~3e-6 at this lr, and move by more than 5e-4.
STEPS = ("--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--lr", "1e-3", "--lm-lr", "1e-3",
         "--log-every", "1", "--precision", "fp32", "--workers", "0")
TOL = 2e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory, cached_synth, untrained) -> dict:
    """16 synthetic images with their features cached, and an (untrained) stage-1 checkpoint per LM."""
    root = tmp_path_factory.mktemp("fsdp")
    d = cached_synth(root, "instruct_train", "instruct_val")
    return {**d, "stage1": {lm: untrained(root / f"stage1-{lm}", lm) for lm in ("tiny-llama", "tiny-phi")}}


def finetune_args(data: dict, mode: str, out: Path, *extra) -> list[str]:
    lm, flags = CASES[mode]
    args = ["finetune", "--checkpoint", data["stage1"][lm], "--data", data["instruct_train"], "--val-data",
            data["instruct_val"], "--images", data["images"], "--features", data["features"], "--output", out,
            *flags, *STEPS, *extra]
    return [str(a) for a in args]


def fsdp_args(data: dict, mode: str, out: Path) -> list[str]:
    return finetune_args(data, mode, out, "--nproc", "2", "--fsdp", mode, "--batch-size", "4")


def one_args(data: dict, mode: str, out: Path) -> list[str]:
    return finetune_args(data, mode, out, "--batch-size", "8")  # the same global batch in one process


def log(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in log_records(out) if key in r]


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, data) -> dict:
    """The FSDP run (2 processes) and the one-process run of a case, each 4 steps from the stage-1 checkpoint."""
    mode = request.param
    fsdp, one = data["root"] / f"{mode}-fsdp", data["root"] / f"{mode}-one"
    stderr = run_cli(*fsdp_args(data, mode, fsdp)).stderr
    assert main(one_args(data, mode, one)) == 0
    return {"mode": mode, "fsdp": fsdp, "one": one, "stderr": stderr}


@pytest.mark.slow
def test_fsdp_trains_like_one_process_and_its_checkpoint_loads_alone(runs, data, tmp_path):
    mode, fsdp, one = runs["mode"], runs["fsdp"], runs["one"]
    assert f"FSDP {mode}: 2 decoder layers and the root sharded over 2 processes" in runs["stderr"]
    assert "global batch 8 (4 x 2 procs x 1 accum)" in runs["stderr"]
    assert max_diff(fsdp / "checkpoint", one / "checkpoint") < TOL
    stage1 = load_file(str(data["stage1"][CASES[mode][0]] / "projector.safetensors"))
    trained = weights(one / "checkpoint")
    assert min((trained[k] - stage1[k]).abs().max().item() for k in stage1 if "feature_norm" not in k) > 5e-4
    for key, steps in (("loss", [1, 2, 3, 4]), ("val_loss", [2, 4])):  # validation runs sharded too
        f, o = log(fsdp, key), log(one, key)
        assert [s for s, _ in f] == [s for s, _ in o] == steps
        assert [v for _, v in f] == pytest.approx([v for _, v in o], abs=TOL), key

    # the checkpoint is an ordinary one: it answers like the one-process run's, and finetunes, in one process
    image = Path(data["images"]) / json.loads(Path(data["instruct_val"]).read_text())[0]["image"]
    logits = [first_logits(Assistant(run / "checkpoint", "cpu"), open_rgb(image), "What color is the circle?")
              for run in (fsdp, one)]
    torch.testing.assert_close(*logits, rtol=0, atol=1e-4)
    more = tmp_path / "more"
    assert main(["finetune", "--checkpoint", str(fsdp / "checkpoint"), *finetune_args(data, mode, more)[3:],
                 "--batch-size", "8", "--max-steps", "1"]) == 0
    assert json.loads((more / "checkpoint" / "state.json").read_text())["step"] == 1


@pytest.mark.slow
def test_fsdp_resumes_under_fsdp_and_in_one_process(runs, data, tmp_path, caplog):
    mode, fsdp, one = runs["mode"], runs["fsdp"], runs["one"]
    step2 = fsdp / "checkpoints" / "step-0000002"
    saved = torch.load(step2 / state.TRAINER_FILE, weights_only=True)["optimizer"]
    assert all(isinstance(k, str) and k.startswith("vlm.") for k in saved["state"])  # keyed by parameter name
    assert max_diff(step2, one / "checkpoints" / "step-0000002") < TOL  # written whole, in the usual format

    again = tmp_path / "fsdp"  # the FSDP run, stopped after its step-2 checkpoint, resumed under FSDP
    shutil.copytree(fsdp, again)
    shutil.rmtree(again / "checkpoint")
    stderr = run_cli(*fsdp_args(data, mode, again)).stderr
    assert f"resuming from {again / 'checkpoints' / 'step-0000002'}" in stderr and "training steps 3..4" in stderr
    assert max_diff(again / "checkpoint", fsdp / "checkpoint") == 0  # as if never stopped

    alone = tmp_path / "one"  # ... and resumed in one process
    shutil.copytree(fsdp, alone)
    shutil.rmtree(alone / "checkpoint")
    caplog.set_level("INFO")
    assert main(one_args(data, mode, alone)) == 0
    assert f"resuming from {alone / 'checkpoints' / 'step-0000002'}" in caplog.text
    assert max_diff(alone / "checkpoint", one / "checkpoint") < TOL


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_fsdp(data, tmp_path):
    """An optimizer state saved by position (one process or DDP) is matched to the sharded parameters by name."""
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert main(one_args(data, "full", one)) == 0
    shutil.copytree(one, fsdp)
    shutil.rmtree(fsdp / "checkpoint")
    assert isinstance(next(iter(torch.load(fsdp / "checkpoints" / "step-0000002" / state.TRAINER_FILE,
                                           weights_only=True)["optimizer"]["state"])), int)
    stderr = run_cli(*fsdp_args(data, "full", fsdp)).stderr
    assert "training steps 3..4" in stderr
    assert max_diff(fsdp / "checkpoint", one / "checkpoint") < TOL


@pytest.mark.parametrize("flags, message", [
    (("--lm-tuning", "qlora"), "--fsdp cannot shard QLoRA's 4-bit bitsandbytes weights"),
    (("--objective", "mixed"), "--fsdp needs --objective standard"),
    (("--precision", "fp16"), "--fsdp trains in bf16 or fp32"),
    (("--fsdp", "zero3"), "unknown --fsdp 'zero3'; valid: none, full, grad-op"),
])
def test_combinations_fsdp_cannot_train_are_refused_in_one_line(data, tmp_path, capsys, flags, message):
    argv = finetune_args(data, "full", tmp_path / "run", "--nproc", "2", "--fsdp", "full", *flags)
    assert main(argv) == 2  # refused before torchrun starts the processes
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("phivlm:")]
    assert len(said) == 1 and said[0].startswith(f"phivlm: error: {message}") and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
