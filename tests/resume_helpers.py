"""For tests/test_resume.py and tests/test_interruption.py: runs of train.py (in a subprocess or
in the test's process), one of them killed with SIGKILL, stopped by a signal or by a full disk.

The helper callbacks are put into a run's callbacks by class path (`resume_helpers.KillAtStep`,
with `tests/` on PYTHONPATH); each acts at the start of the batch after `step` optimiser steps:
- `KillAtStep` kills its own process, as `kill -9` would, with no chance to clean up or save anything;
- `SignalAtStep` sends its own process SIGTERM or SIGINT, as `timeout` or Ctrl-C would;
- `FileSizeLimitAtStep` lets no file grow past `limit` bytes from then on (RLIMIT_FSIZE, SIGXFSZ
  ignored so that a write past it fails with EFBIG): a disk that fills up mid-run, without root.
The last two act only in a fresh run, not a resumed one, so that the run's own saved config
(which names them) resumes it as the printed resume command says.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import yaml

from tests.in_process import fit_in_this_process

REPO = Path(__file__).resolve().parents[1]
SECONDS = "seconds"  # wall-clock entries (`seconds`, `kfac_seconds`, …) differ between any two runs


class KillAtStep(L.Callback):
    """SIGKILL the training process once `step` optimiser steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Send this process `signal` ('SIGTERM' or 'SIGINT') once `step` optimiser steps are done:
    at the next training batch, or `in_validation` at the first batch of the validation after it."""

    def __init__(self, step: int, signal: str, in_validation: bool = False):
        self.step, self.signal, self.in_validation = step, signal, in_validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.in_validation:
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.in_validation and batch_idx == 0 and not trainer.sanity_checking:
            self._send(trainer)

    def _send(self, trainer) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            os.kill(os.getpid(), getattr(signal, self.signal))


class FileSizeLimitAtStep(L.Callback):
    """From `step` optimiser steps on, no file of this process may grow past `limit` bytes."""

    def __init__(self, step: int, limit: int):
        self.step, self.limit = step, limit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def checkpoint_every(steps: int) -> dict:
    """A ModelCheckpoint keeping a checkpoint every `steps` optimiser steps."""
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": steps, "save_top_k": -1, "filename": "{step}"}}


def killer(step: int) -> dict:
    return {"class_path": "resume_helpers.KillAtStep", "init_args": {"step": step}}


def signaller(step: int, signal_name: str, in_validation: bool = False) -> dict:
    return {"class_path": "resume_helpers.SignalAtStep",
            "init_args": {"step": step, "signal": signal_name, "in_validation": in_validation}}


def file_size_limit(step: int, limit: int) -> dict:
    return {"class_path": "resume_helpers.FileSizeLimitAtStep", "init_args": {"step": step, "limit": limit}}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(workdir: Path, config: Path, *args: str, killed: bool = False,
          returncode: int | None = None) -> subprocess.CompletedProcess:
    """`python train.py fit --config config [args]` in `workdir` with one thread; checks the
    exit: SIGKILL when `killed`, else `returncode` if given, else success."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(config),
                             "--trainer.enable_progress_bar=false", *args],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    expected = -signal.SIGKILL if killed else returncode or 0
    assert result.returncode == expected, (result.returncode, result.stderr[-4000:])
    return result


def train_in_this_process(workdir: Path, config: Path, *args: str) -> None:
    """As `train` for a run that is not killed, in the test's own process (`tests/in_process.py`)."""
    fit_in_this_process(workdir, "--config", str(config), "--trainer.enable_progress_bar=false", *args)


def results(path: Path) -> dict:
    """A run's JSON results without its wall-clock entries."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if SECONDS not in k}
        return value

    return strip(json.loads(path.read_text()))
