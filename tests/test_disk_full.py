"""The disk filling up during a checkpoint save: one-line error, the previous checkpoint stays intact."""
from __future__ import annotations

import errno
from pathlib import Path

from phivlm.cli import main


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_during_checkpoint_keeps_previous(synth_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--vision", "tiny-clip", "--lm", "tiny-phi", "--data", synth_data["captions_train"],
            "--images", synth_data["images"], "--features", str(tmp_path / "feat"), "--output", str(out),
            "--max-steps", "2", "--batch-size", "4", "--resume", "none"]
    assert main(args) == 0
    before = _files(out / "checkpoint")

    import phivlm.train.checkpoint as ckpt_mod

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoint"))

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    capsys.readouterr()
    assert main(args + ["--lr", "0.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("phivlm: error:") and "No space left on device" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert _files(out / "checkpoint") == before  # the earlier checkpoint is byte-identical
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no temporary leftovers
