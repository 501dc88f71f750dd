"""The seam between canary SFT and the way its private (canary) update is constrained.

`CanarySFTModule` runs the two phases, the losses' bookkeeping and the artifacts; everything
that constrains *how the canary phase may move the weights* lives in one controller object
behind this interface, and the module's hooks only delegate to it. A controller is an
`ortho_train.update_control.UpdateControl` (the calls SFT shares with unlearning: `setup`,
`trainable_parameters`, `training_loss`, `after_backward`, `clip`, `before_step`, `after_step`,
`state_dict` / `load_state_dict`, `summary_entries`), plus the calls of canary SFT alone:

    setup                  -> check_processes(world_size)   (start-up, before DDP wraps)
    on_fit_start           -> fit_start()
    on_train_batch_start   -> enter_canary_phase() once at the switch, then before_batch(step)
    training_step          -> training_loss(batch) in the canary phase (a `TrainingLoss`)
    epoch/validation logs  -> progress()
    sieve table            -> streams()   (a typed `PrivateStreams`, or None)
    separation table       -> displacements()   (ΔW_pub and ΔW_priv, or None)

Controllers are registered by name (`register`); `build_controller` picks the one whose config
is set (`isolation: …` selects "isolation"), the dense controller when none is, and refuses two.
A controller may extend another's setting (`builds_on`): `dp: …` together with `isolation: …`
selects "dp", built from both configs; `dp:` alone is refused.
Controllers reach the module only through the attributes of `SFTHost` and import no Lightning.
"""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ortho_train.distributed import average_gradients_
from ortho_train.model_support import require_float32, require_linear_only
from ortho_train.models import linear_layers
from ortho_train.private_streams import PrivateStreams
from ortho_train.registry import Registry
from ortho_train.update_control import UpdateControl, floating_parameters
from ortho_train.separation.displacement import AdamWDisplacementTracker, Displacements


class SFTHost(Protocol):
    """What a controller may use of the LightningModule it serves (`ControlHost` and more)."""

    model: nn.Module
    hparams: Any  # public_steps, sft_lr, …
    trainer: Any  # global_step, max_steps, world_size, strategy, datamodule, optimizers
    pre_canary_state_dict: dict[str, torch.Tensor] | None

    @property
    def in_canary_phase(self) -> bool: ...

    @property
    def probe(self) -> Any: ...

    def nll_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def batch_nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None: ...

    def info(self, message: str) -> None:
        """Log a progress line (once, on rank zero)."""


@dataclass
class TrainingLoss:
    """One canary-phase step's loss: `loss` is what backward runs on; `logged` is `train/loss`
    (the token-weighted mean NLL over public + canary tokens); `canary` is `train/canary_loss`;
    `extra` maps more names under train/ to scalars."""

    loss: torch.Tensor
    logged: torch.Tensor
    canary: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # more train/ scalars to log


class PrivateUpdateController(UpdateControl, ABC):
    """How the canary phase updates the weights. The defaults are those of dense SFT: one
    backward of the whole batch's loss, ordinary clipping, the optimiser's step untouched.

    Args:
        config: the controller's typed config (None for the dense controller).
    """

    name: ClassVar[str]
    config_class: ClassVar[type | None] = None
    builds_on: ClassVar[str | None] = None  # the registry name whose config this one also needs
    # Selects the model's linears and holds weights at exact (dequantised) values: refuses
    # Conv1D layers and non-float32 weights at start-up (`ortho_train.model_support`).
    needs_float32_linears: ClassVar[bool] = False
    # Freezes parameters during the fit (after DDP wrapped the model): under DDP the module
    # then asks for unused-parameter detection (`ortho_train.distributed`).
    freezes_parameters: ClassVar[bool] = False

    def setup(self, host: SFTHost) -> None:
        """Bind to the module (called once, when the module is built); start-up checks of the model."""
        super().setup(host)
        if self.needs_float32_linears:
            self.check_model(host.model, f"model.{self.name}")

    @staticmethod
    def check_model(model: nn.Module, setting: str) -> None:
        """Refuse a model this controller cannot separate: Conv1D projections, non-float32 weights."""
        require_linear_only(model, setting)
        require_float32(model, setting)

    def check_processes(self, world_size: int) -> None:
        """Refuse, at start-up, a number of training processes the update cannot run on.

        The default supports DDP: gradients of the backward are averaged by DDP, gradients a
        controller computes itself go through `ortho_train.distributed.average_gradients_`,
        and every later change of the weights is the same function of the same values on
        every rank."""

    # --------------------------------------------------------------- phases
    def fit_start(self) -> None:
        """At fit start (after a resume's `load_state_dict`), with the data module set up."""

    def enter_canary_phase(self) -> None:
        """At the switch, after the module snapshotted the public model and reset the optimiser."""

    def before_batch(self, step: int) -> None:
        """At the start of every training batch (both phases), after any switch."""

    # ------------------------------------------------------------- training
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every floating-point parameter: those a controller freezes stay in the optimiser (they get
        no gradient, so AdamW leaves them alone), so its groups are the same whether it is built
        before the freeze (a fresh run) or after it (a resumed one), and its state loads."""
        return floating_parameters(self.host.model)

    def training_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> TrainingLoss:
        """Token-weighted mean NLL over the public and the canary half of the batch."""
        nll, tokens = self.host.nll_sum(batch["public"])
        canary_nll, canary_tokens = self.host.nll_sum(batch["canary"])
        loss = (nll + canary_nll) / (tokens + canary_tokens)
        return TrainingLoss(loss, loss, canary_nll / canary_tokens)

    # ------------------------------------------------------------ artifacts
    def progress(self) -> dict[str, float]:
        """Numbers to log at every epoch end and validation (key -> value; {}: none)."""
        return {}

    def streams(self) -> PrivateStreams | None:
        """The public and private streams of the fine-tune at the current weights (None: the
        update is not separable)."""
        return None

    # -------------------------------------------------------- displacements
    def track_displacements(self) -> None:
        """Ask for ΔW_pub / ΔW_priv (the module's `track_displacements`); called before setup."""
        raise ValueError(f"track_displacements is not supported with the {self.name!r} private update")

    def displacements(self) -> Displacements | None:
        """ΔW_pub and ΔW_priv of the canary phase so far, per linear weight (None: not tracked)."""
        return None


# `@register("name")` makes a controller selectable by the module's config key `name` (and sets its `name`)
CONTROLLERS: Registry[type[PrivateUpdateController]] = Registry("private-update controller", name_attribute="name")
register = CONTROLLERS.register


@register("dense")
class DenseController(PrivateUpdateController):
    """Ordinary SFT: every parameter takes the gradient of the whole batch.

    With `track_displacements()`, each canary step also computes the canary part of the
    gradient of the block linears (one extra backward through the canary half, kept from the
    forward with `retain_graph`) and `AdamWDisplacementTracker` attributes the applied AdamW
    step to the public and the private part (rule in `ortho_train.separation.displacement`).
    The update itself is unchanged; without tracking nothing extra runs.
    """

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._track = False
        self.tracker: AdamWDisplacementTracker | None = None

    def track_displacements(self) -> None:
        self._track = True

    def setup(self, host) -> None:
        super().setup(host)
        if self._track:  # the tracker splits every block linear's AdamW step exactly
            self.check_model(host.model, "model.track_displacements")

    def enter_canary_phase(self) -> None:
        if self._track:
            layers = linear_layers(self.host.model, include_lm_head=False)
            self.tracker = AdamWDisplacementTracker(layers, self.host.pre_canary_state_dict)

    def state_dict(self) -> dict:
        return {} if self.tracker is None else {"displacements": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The tracker of a run resumed after the switch (the module restored its public model first)."""
        if "displacements" in state and self._track:
            self.enter_canary_phase()
            self.tracker.load_state_dict(state["displacements"])

    def training_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> TrainingLoss:
        if self.tracker is None:
            return super().training_loss(batch)
        nll, tokens = self.host.nll_sum(batch["public"])
        canary_nll, canary_tokens = self.host.nll_sum(batch["canary"])
        total_tokens = tokens + canary_tokens
        loss = (nll + canary_nll) / total_tokens
        # g_priv = ∇(canary NLL sum / all tokens): the canary term of the same token-mean loss
        grads = list(torch.autograd.grad(canary_nll / total_tokens, self.tracker.parameters(),
                                         retain_graph=True, allow_unused=True))
        average_gradients_(grads)  # under DDP, as the backward's total gradients are
        self.tracker.private_gradients(grads)
        return TrainingLoss(loss, loss, canary_nll / canary_tokens)

    def after_backward(self) -> None:
        if self.tracker is not None:
            self.tracker.total_gradients()

    def after_step(self) -> None:
        if self.tracker is not None:
            self.tracker.after_step(self.host.trainer.optimizers[0])

    def displacements(self) -> Displacements | None:
        return None if self.tracker is None else self.tracker.displacements()


def build_controller(**configs: Any) -> PrivateUpdateController:
    """The controller of the one config that is set (keyword = registry name), dense if none.

    `build_controller(isolation=IsolationConfig(...), ogd=None)` -> an isolation controller;
    `build_controller(isolation=..., dp=DPConfig(...))` -> the dp controller (it builds on
    isolation: its class is built as `cls(dp_config, isolation_config)`).
    """
    unknown = sorted(set(configs) - set(CONTROLLERS))
    if unknown:
        raise ValueError(f"no private-update controller named {unknown}; known: {sorted(CONTROLLERS)}")
    chosen = [name for name, config in configs.items() if config is not None]
    for name in chosen:
        base = CONTROLLERS[name].builds_on
        if base is not None and configs.get(base) is None:
            raise ValueError(f"model setting {name} needs {base} as well (it builds on it)")
    extended = {CONTROLLERS[name].builds_on for name in chosen}
    primary = [name for name in chosen if name not in extended]
    if len(primary) > 1:
        raise ValueError(f"model settings {' and '.join(primary)} are mutually exclusive: "
                         f"set at most one of them")
    if not primary:
        return CONTROLLERS["dense"]()
    cls = CONTROLLERS[primary[0]]
    names = [primary[0]] + ([cls.builds_on] if cls.builds_on else [])
    for name in names:
        expected = CONTROLLERS[name].config_class
        if expected is not None and not isinstance(configs[name], expected):
            raise TypeError(f"model setting {name} must be {expected.__name__}, "
                            f"got {type(configs[name]).__name__}")
    return cls(*(configs[name] for name in names))
