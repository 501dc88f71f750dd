"""How an unlearning run updates the model: the `UnlearnModule(mode=…)` strategies.

A mode decides which parameters train and may act at the start of the run and around every
optimiser step; the module calls these hooks and never tests the mode's name. A mode is an
`ortho_train.update_control.UpdateControl`, the interface canary SFT's private-update controllers
implement too: the module delegates `after_backward`, `clip`, `before_step` / `after_step`,
`training_loss`, `trainable_parameters`, `state_dict`, `summary_entries` to it through the same
calls (`UpdateControlHooks`). The unlearning-only calls are below (`check_settings`,
`check_model`, `prepare` before the module exists; `start` and `report` around the run).

The base class is the `full` mode (every parameter trains, nothing else happens). A new mode is
one file with a subclass and one line in `ortho_train.unlearning.modes.UPDATE_MODES`; its
settings (a dataclass, `settings_class`) come with it: `mode: {class_path: <its class>,
init_args: {settings: {...}}}` in a config, or its name alone for the default settings.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from ortho_train.model_support import refuse_float16_training
from ortho_train.update_control import UpdateControl

Batches = Sequence[Mapping[str, Tensor]]


class UpdateMode(UpdateControl):
    """Full-parameter unlearning: every parameter of the model trains.

    Subclasses override what they change. `settings_class` is the mode's settings dataclass
    (None: the mode has none); `settings_argument` the older `UnlearnModule` argument that
    may hold them (`lora`, `mansu`; None for a newer mode, whose settings come with it).
    """

    name: ClassVar[str] = "full"
    settings_class: ClassVar[type | None] = None
    settings_argument: ClassVar[str | None] = None
    needs_start_attribution: ClassVar[bool] = False  # the start needs forget/retain attributions

    def __init__(self, settings: Any = None):
        if settings is None and self.settings_class is not None:
            settings = self.settings_class()
        super().__init__(settings)
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

    def summary(self) -> dict | None:
        """The mode's settings for the metrics card (under its name; None: no entry)."""
        return None

    def retain_batches_wanted(self, batch_size: int) -> int:
        """Public batches the start needs beyond CAD's attribution batches (0: none)."""
        return 0

    def start(self, forget: Batches, retain: Batches, forget_scores: Mapping[str, Tensor] | None,
              names: Sequence[str], broadcast: Callable[[Any], Any]) -> None:
        """Measure what the mode needs on the starting weights (not called on resume)."""

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    # ---------------------------------------------------------------- training
    def training_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """The unlearning objective's parts (`loss` first among them); None skips the step."""
        return self.host.unlearning_loss(batch)

    def report(self, forget_scores_before: Mapping[str, Tensor] | None,
               forget_scores_after: Mapping[str, Tensor] | None) -> dict:
        """Entries of the final report."""
        return {}

