"""How an unlearning run updates the model: the `UnlearnModule(mode=…)` strategies.

A mode decides which parameters train and may act at the start of the run and around every
optimiser step; the module calls these hooks and never tests the mode's name. The base class is
the `full` mode (every parameter trains, nothing else happens). A new mode is one file with a
subclass and one line in `ortho_train.unlearning.modes.UPDATE_MODES`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from ortho_train.model_support import refuse_float16_training

Batches = Sequence[Mapping[str, Tensor]]


class UpdateMode:
    """Full-parameter unlearning: every parameter of the model trains.

    Subclasses override what they change. `settings_argument` names the `UnlearnModule`
    argument that holds the mode's settings (None: the mode has none).
    """

    name: ClassVar[str] = "full"
    settings_argument: ClassVar[str | None] = None
    needs_start_attribution: ClassVar[bool] = False  # the start needs forget/retain attributions

    def __init__(self, settings: Any = None):
        self.settings = settings

    # ---------------------------------------------------------------- start-up
    def check_settings(self, weight_decay: float, dtype: torch.dtype) -> None:
        """Refuse, before the model is loaded, settings this mode cannot train with."""
        refuse_float16_training(dtype, f"model.mode={self.name}")

    def check_model(self, model: nn.Module) -> None:
        """Refuse a loaded model this mode cannot update (layer types, dtypes)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train (wrapped or with parameters frozen); the argument is the loaded model."""
        return model

    def card(self) -> dict:
        """The mode's settings for the metrics card."""
        return {}

    def retain_batches_wanted(self, batch_size: int) -> int:
        """Public batches the start needs beyond CAD's attribution batches (0: none)."""
        return 0

    def start(self, model: nn.Module, forget: Batches, retain: Batches, forget_scores: Mapping[str, Tensor] | None,
              names: Sequence[str], broadcast: Callable[[Any], Any]) -> None:
        """Measure what the mode needs on the starting weights (not called on resume)."""

    def trainable_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    # ---------------------------------------------------------------- training
    def before_optimizer_step(self, model: nn.Module) -> None:
        """Adjust the gradients of the coming step."""

    def after_step(self, model: nn.Module) -> dict[str, float]:
        """Adjust the weights the step produced; returns metrics to log."""
        return {}

    def report(self, forget_scores_before: Mapping[str, Tensor] | None,
               forget_scores_after: Mapping[str, Tensor] | None) -> dict:
        """Entries of the final report."""
        return {}

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `start` measured, from a checkpoint."""
