"""The global random generators of a run, carried through a checkpoint.

Whatever draws from the global generators during training (dropout, LoRA dropout, the training
loaders' pass seeds, a shuffled loader built by a callback) must draw the same numbers in a
resumed run as in the uninterrupted one. `GlobalRNG.save` puts the states of Python's `random`,
NumPy's and torch's CPU (and CUDA) generators into the checkpoint as they are when it is written
(after step k); `load` keeps them, and `apply_pending`, called by the modules in `on_train_start`
(after the set-up work of the resumed run, which draws what the uninterrupted run drew before
step 0, and before the first batch after the checkpoint is fetched), sets them. A training loader
whose pass ends at step k then draws the next pass's seed where the uninterrupted run drew it
(`ortho_train.resumable_loader`).
"""
from __future__ import annotations

import random

import numpy as np
import torch

CHECKPOINT_KEY = "global_rng"


def collect() -> dict:
    """The states of the global generators (plain tensors and numbers: loadable with
    `torch.load(weights_only=True)`)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Set the global generators to `state` (from `collect`)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GlobalRNG:
    """Save the global generators into a checkpoint, and set them again at the next training batch."""

    def __init__(self):
        self._pending: dict | None = None

    def save(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = collect()

    def load(self, checkpoint: dict) -> None:
        self._pending = checkpoint.get(CHECKPOINT_KEY)

    def apply_pending(self) -> None:
        """Restore the loaded states once (a no-op without a resume); call it in `on_train_start`."""
        if self._pending is not None:
            restore(self._pending)
            self._pending = None
