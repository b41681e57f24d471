"""What a training run leaves readable in its output folder, written by rank 0 alone (other ranks' calls do nothing):
``train.log`` (the log records), ``config.yaml`` (the resolved config), ``log.jsonl`` (one record per logged step
and validation), ``tb/`` (the same for TensorBoard, where it is installed), ``skipped.jsonl`` (bad samples), and
the progress bar."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from ..config import RunConfig
from ..errors import PhivlmError

log = logging.getLogger(__name__)


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed
        return None
    return SummaryWriter(str(folder))


class RunLog:
    def __init__(self, folder: str | Path, main: bool = True):
        """Check that ``folder`` is writable and send the log records to its ``train.log`` (one run log at a time)."""
        self.out, self.main = Path(folder), main
        self._jsonl = self._tb = None
        if not main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise PhivlmError(f"{self.out}: output folder is not writable ({e.strerror})") from None
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "phivlm_run", False)]:
            root.removeHandler(h)
            h.close()
        handler = logging.FileHandler(self.out / "train.log")
        handler.phivlm_run = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)

    def start(self, cfg: RunConfig) -> None:
        """Write the run's resolved config; open ``log.jsonl`` (appending: a resumed run continues it) and ``tb/``."""
        if self.main:
            cfg.save(self.out / "config.yaml")
            self._jsonl = open(self.out / "log.jsonl", "a")
            self._tb = _summary_writer(self.out / "tb")

    def info(self, msg: str, *args) -> None:
        if self.main:
            log.info(msg, *args)

    def record(self, rec: dict) -> None:
        """One line of ``log.jsonl``; its numbers but the step and the time also go to TensorBoard."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "elapsed_s"):
                    self._tb.add_scalar(k, v, rec["step"])

    def progress(self, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not self.main)

    def skipped(self, skipped: list[dict]) -> None:
        if self.main and skipped:
            with open(self.out / "skipped.jsonl", "w") as f:
                f.writelines(json.dumps(s) + "\n" for s in skipped)
            log.warning("%d bad samples skipped; see %s", len(skipped), self.out / "skipped.jsonl")

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._tb = None
