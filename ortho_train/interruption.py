"""A run stopped before its end keeps its work: checkpoint, model, `summary.json`, resume command.

Stop signals. SIGTERM (`timeout`, `docker stop`, a batch scheduler) is caught by Lightning, which
raises `SIGTERMException` once the current step is done (every DDP rank at the same step) and
would then exit 0 with nothing saved. SIGINT (Ctrl-C) would raise `KeyboardInterrupt` wherever the
process is, half-way through an optimiser step perhaps. `InterruptionCallback` takes SIGINT from
the start of training: the first Ctrl-C is turned into a SIGTERM of the process, so both signals
stop at the same clean point; a second Ctrl-C aborts at once. On the `SIGTERMException` the
callback saves, on every rank and in this order:
1. `<checkpoints>/interrupted-step=N.ckpt` (a resumable checkpoint of the last whole step);
2. through the module's `save_interrupted(record)`, if it has one, the model as it stands and
   `summary.json` with `status: interrupted` (no final evaluation, no tables: a scheduler waits
   seconds, not minutes, before SIGKILL); a module without it gets the record as `summary.json`;
3. then prints the resume command and sets the exit status to 128 + the signal (130 for SIGINT,
   143 for SIGTERM): Lightning ends the process with it after its teardown.

A signal during a validation stops it mid-way (Lightning's choice): the checkpoint then resumes
into the rest of that validation, whose logged numbers may be missing or cover only part of it;
the training itself, and so the final numbers, continue exactly (tested). A signal after the last
step lets the run finish; from then on a Ctrl-C stops the final evaluation or the tables at once,
as it would anywhere.

A full disk (`DiskSpaceError`, e.g. a checkpoint that does not fit) is handled the same way, except
that no new checkpoint is tried: the model and the summary are saved if they fit, the resume
command names the newest checkpoint on disk, and the error ends the run (exit 1).

The callback is added by train.py to every run, first in the list, so the checkpoint and the model
are saved before any other callback reacts to the exception (the report, say).
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ortho_train.artifacts import DiskSpaceError, write_json_atomic

INTERRUPTED = "interrupted"  # summary.json's status for a run that stopped before its end


class InterruptionCallback(L.Callback):
    """Save a stopped run's checkpoint, model and summary; exit 130/143 with the resume command."""

    def __init__(self):
        self.signal: int | None = None  # the first stop signal, once received
        self._previous_sigint = None
        self._run_dir: Path | None = None

    # ------------------------------------------------------------------ signals
    def on_train_start(self, trainer, pl_module) -> None:
        # trainer.log_dir is a collective: resolved here on every rank, not in rank-zero code
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.signal = signal.SIGINT
        print("\nCtrl-C: stopping after the current step, with a checkpoint and the model "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        # Lightning's SIGTERM handler (installed at fit start) stops every DDP rank at the step's end
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        # Training is over (callbacks' on_train_end come before the module's, which saves the model):
        # from here a Ctrl-C stops the final evaluation or the tables at once, as it would anywhere.
        self._restore_sigint()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_sigint()

    # -------------------------------------------------------------- the rescue
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        started = self._run_dir is not None and trainer.global_step > 0  # else nothing to keep (train.py
        # removes the run directory of a run that stopped before its first step)
        if isinstance(exception, SIGTERMException):
            signum = self.signal or signal.SIGTERM
            # SIGTERMException is a SystemExit without a code (exit 0): Lightning re-raises it after
            # its teardown, and the process then ends with the shell's code for the signal.
            exception.code = 128 + signum
            if started:
                self._rescue(trainer, pl_module, signal.Signals(signum).name, self._save_checkpoint(trainer))
        elif isinstance(exception, DiskSpaceError) and started:
            newest = newest_checkpoint(self._checkpoint_dir(trainer))
            self._rescue(trainer, pl_module, f"disk full: {exception}", newest)

    def _rescue(self, trainer, pl_module, reason: str, checkpoint: Path | None) -> None:
        """Save the model and summary.json, then print what was kept and the resume command."""
        record = self._record(trainer, reason, checkpoint)
        self._save_model_and_summary(trainer, pl_module, record)
        if trainer.is_global_zero:
            print(f"\nrun stopped at step {trainer.global_step} ({reason}): {self._kept(record)}\n"
                  f"resume with: {record['resume_command'] or '(no checkpoint to resume from)'}",
                  file=sys.stderr, flush=True)

    def _checkpoint_dir(self, trainer) -> Path:
        """Where the run's checkpoints go: its ModelCheckpoint's directory, else `<run>/checkpoints`."""
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None) if callback is not None else None
        return Path(dirpath) if dirpath else self._run_dir / "checkpoints"

    def _save_checkpoint(self, trainer) -> Path | None:
        """A checkpoint of the last whole step (every rank takes part; rank zero writes)."""
        path = self._checkpoint_dir(trainer) / f"interrupted-step={trainer.global_step}.ckpt"
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the whole state: weights, optimiser, loops
        except OSError as error:  # e.g. no room: the model and summary may still fit
            rank_zero_warn(f"could not save the interrupted run's checkpoint {path}: {error}")
            return newest_checkpoint(path.parent)
        return path

    def _record(self, trainer, reason: str, checkpoint: Path | None) -> dict:
        return {"status": INTERRUPTED, "reason": reason, "step": trainer.global_step, "max_steps": trainer.max_steps,
                "checkpoint": str(checkpoint) if checkpoint else None,
                "resume_command": resume_command(self._run_dir, checkpoint) if checkpoint else None}

    def _save_model_and_summary(self, trainer, pl_module, record: dict) -> None:
        """The module's model and summary (or the record alone); a failure is reported, not raised,
        so the original stop reason is what ends the run."""
        save = getattr(pl_module, "save_interrupted", None)
        try:
            if save is not None:
                save(record)
            elif trainer.is_global_zero:
                write_json_atomic(self._run_dir / "summary.json", record)
        except OSError as error:
            rank_zero_warn(f"could not save the interrupted run's model or summary in {self._run_dir}: {error}")

    def _kept(self, record: dict) -> str:
        kept = [name for name in ("hf_model", "summary.json") if (self._run_dir / name).exists()]
        if record["checkpoint"]:
            kept.append(record["checkpoint"])
        return f"kept {', '.join(kept)} in {self._run_dir}" if kept else f"nothing could be saved in {self._run_dir}"


def newest_checkpoint(directory: Path) -> Path | None:
    """The most recently written `*.ckpt` of `directory` (None: none)."""
    found = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if directory.is_dir() else []
    return found[-1] if found else None


def resume_command(run_dir: Path, checkpoint: Path) -> str:
    """`python train.py fit --config <run>/config.yaml --ckpt_path <checkpoint>` (README, "Resume"):
    the run's saved config continues it in its own directory."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"  # not pytest's
    return shlex.join(["python", script, "fit", "--config", str(run_dir / "config.yaml"),
                       "--ckpt_path", str(checkpoint)])
