"""Checkpoints written like every other artifact, and read with an error a person can act on.

Lightning's `TorchCheckpointIO` stages a checkpoint in a temporary directory of the system
(fsspec's local transaction) and then moves it: across filesystems the move is a copy, and on a
full disk it leaves a truncated file under the checkpoint's final name, which a later
`--ckpt_path` half-loads or fails on with torch's zip-reader message. `AtomicCheckpointIO`
serialises the checkpoint in memory (as Lightning does), so its size is known, checks the room
in the checkpoint's directory, and writes it with `ortho_train.artifacts.write_bytes_atomic`
(temporary in the same directory, fsync, rename). Reading a file that is no checkpoint
(truncated, damaged, or something else) raises `UnreadableCheckpointError`, which names the file,
its size and the checkpoints beside it, and never suggests loading with `weights_only=False`
(that runs whatever code the file holds). `use_atomic_checkpoints(trainer)` installs it; train.py
does so for every run, and turns the same errors of LightningCLI's own first read of the file
(for its hyper-parameters, before any Trainer exists) into `UnreadableCheckpointError`.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from ortho_train.artifacts import write_bytes_atomic
from ortho_train.run_paths import CKPT_ALIASES
from ortho_train.settings import SettingError, show

# What torch.load raises for a file that is not a whole checkpoint: a cut zip archive
# (RuntimeError from its reader, or OSError from a seek before the file's start), a pickle that
# ends early (EOFError) or holds other things (UnpicklingError, also the weights-only refusal),
# or bytes that are neither. A missing or forbidden file keeps its own error.
DAMAGED = (RuntimeError, EOFError, zipfile.BadZipFile, OSError)
LOAD_ERRORS = (*DAMAGED, pickle.UnpicklingError)  # raised by torch.load itself, whatever reads the file
UNREADABLE = (*LOAD_ERRORS, ValueError, KeyError, AttributeError, TypeError)
FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


class UnreadableCheckpointError(SettingError):
    """A checkpoint file that cannot be loaded; the message says which and what to do."""

    @classmethod
    def for_file(cls, path, error: BaseException | None) -> UnreadableCheckpointError:
        return cls(_unreadable(Path(path), error))


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes local checkpoints atomically and refuses unreadable ones clearly."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's own transaction
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(path, buffer.getbuffer(), what=f"checkpoint {Path(path).name}")

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FILE_ERRORS:
            raise
        except UNREADABLE as error:
            raise UnreadableCheckpointError.for_file(path, error) from None  # torch's text suggests weights_only=False
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise UnreadableCheckpointError.for_file(path, None)
        return checkpoint


def _unreadable(path: Path, error: BaseException | None) -> str:
    """The message for a checkpoint that does not load: the file, its size, why, and the alternatives."""
    size = path.stat().st_size if path.is_file() else 0
    if error is None:
        why = "it loads, but holds no Lightning checkpoint (no state_dict)"
    elif isinstance(error, DAMAGED):
        why = "it ends early or is damaged (truncated by a full disk or a copy cut short?)"
    else:
        why = "it is not a checkpoint written by this toolkit"
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    alternatives = (f"resume from another checkpoint of {path.parent} ({', '.join(others)})" if others
                    else "start the run afresh (no other checkpoint lies beside it)")
    return (f"--ckpt_path {path} ({size:,} bytes) cannot be read as a checkpoint: {why}. "
            f"Pass a whole one: {alternatives}")


def check_checkpoint_file(ckpt_path: str | Path | None) -> None:
    """`--ckpt_path` names a file `torch.save` wrote (a zip archive), or a Lightning alias
    ('last', 'best', 'hpc', 'registry…'); anything else is refused before the model is built,
    before LightningCLI reads the file's hyper-parameters (torch's message for a foreign file
    suggests `weights_only=False`)."""
    if ckpt_path is None or str(ckpt_path) in CKPT_ALIASES or str(ckpt_path).startswith("registry"):
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise SettingError(f"ckpt_path={show(str(ckpt_path))}: no such file; pass a checkpoint from "
                           "<run>/version_N/checkpoints/")
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpointError(f"ckpt_path={show(str(ckpt_path))}: not a checkpoint: "
                                        + _unreadable(path, zipfile.BadZipFile("not a zip archive")))


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give `trainer` an `AtomicCheckpointIO`, unless its config chose a checkpoint IO plugin of its own."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
