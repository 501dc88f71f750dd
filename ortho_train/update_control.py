"""One interface for "how a training run's update is restricted or shaped", shared by SFT and unlearning.

Canary SFT constrains its private update (`ortho_train.private_update`: dense, isolation, DP on
the support, OGD); unlearning restricts its update (`ortho_train.unlearning.update_mode`: LoRA,
full, MANSU). Both families are `UpdateControl`s, and both LightningModules delegate to theirs
through the same calls (`UpdateControlHooks`):

    module built                 -> setup(host)
    configure_optimizers         -> trainable_parameters()   (what the module's optimiser steps)
    training_step                -> training_loss(batch)     (what backward runs on)
    on_after_backward            -> after_backward()         (gradients in `.grad`, before clipping)
    configure_gradient_clipping  -> clip(optimizer, max_norm, algorithm)
    optimizer_step               -> before_step(); the optimiser's step; after_step() -> metrics to log
    on_save/load_checkpoint      -> state_dict() / load_state_dict(state)
    summary.json / metrics card  -> summary_entries()        (summary() under the registry name)

Each family adds the calls only it has (the SFT phase switch and stream views; the unlearning
start-up measurement and report), documented on its own base class. A control reaches its
module only through the `ControlHost` attributes and imports no Lightning.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

from torch import nn


class ControlHost(Protocol):
    """What a control may use of the LightningModule it serves (each family's host adds more)."""

    model: nn.Module
    hparams: Any
    trainer: Any

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None: ...

    def info(self, message: str) -> None:
        """Log a progress line (once, on rank zero)."""


class UpdateControl:
    """The defaults: every parameter trains, one backward of the module's loss, ordinary clipping,
    the optimiser's step untouched, nothing to checkpoint or report."""

    name: ClassVar[str] = ""  # the registry name (set by the family's registry)

    def __init__(self, config: Any = None):
        self.config = config
        self.host: ControlHost | None = None

    def setup(self, host: ControlHost) -> None:
        """Bind to the module once its model is built; start-up checks of that model."""
        self.host = host

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the module's optimiser steps, by name (default: those that need a gradient)."""
        return {n: p for n, p in self.host.model.named_parameters() if p.requires_grad}

    def training_loss(self, batch: Any) -> Any:
        """The step's loss for backward (and what to log); each family defines its own result type."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """Gradients of the step are in `.grad` (before clipping)."""

    def clip(self, optimizer, max_norm: float | None, algorithm: str | None) -> None:
        self.host.clip_gradients(optimizer, max_norm, algorithm)

    def before_step(self) -> None:
        """Before the optimiser step (and before this step's forward/backward, which run inside it)."""

    def after_step(self) -> dict[str, float] | None:
        """After the optimiser step: adjust the weights it produced; numbers to log (None/{}: none)."""
        return None

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the control ({}: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()` (on resume)."""

    def summary(self) -> dict | None:
        """The control's entry of the run's record (None: no entry)."""
        return None

    def summary_entries(self) -> dict[str, dict]:
        """Top-level entries of the run's record: `summary()` under the registry name."""
        entry = self.summary()
        return {} if entry is None else {self.name: entry}


class UpdateControlHooks:
    """Mixin for a LightningModule with an `update_control` attribute: the Lightning hooks that
    only delegate to it, the same in every module (put it before `L.LightningModule`)."""

    update_control: UpdateControl

    def on_after_backward(self) -> None:
        self.update_control.after_backward()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.update_control.clip(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        self.update_control.before_step()
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        found = self.update_control.after_step()
        if found:
            self.log_dict(found)


def floating_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every floating-point parameter of `model`, by name (frozen ones included)."""
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


__all__ = ["ControlHost", "UpdateControl", "UpdateControlHooks", "floating_parameters"]
