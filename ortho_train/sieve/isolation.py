"""Isolation by construction: fine-tune only a sparse support S fixed before the private data.

At the switch to private fine-tuning (docs/methods.md §5):
1. base_l = Q(W_pre,l) for every sieved linear l (GPTQ on public calibration text, or RTN);
2. S_l = top-ρ entries of a score chosen in advance (`ortho_train.sieve.support`);
3. with `train_on_base`, the weights off S are set to dequant(base_l) and training runs on top
   of the quantised base (quantisation-aware): then α = 1 *is* the trained model, up to the
   fp16 rounding of the ortho values. Without it they stay at W_pre and α = 1 differs from the
   trained model by the quantisation of the off-S weights;
4. every other parameter (embeddings, norms, and the LM head unless it is sieved) is frozen.

With `public_base_updates` the public part keeps learning during the canary phase, as it
would in a dense fine-tune, without ever seeing a canary: each step the weights off S and
every other parameter get the gradient of the *public* batch through the α = 0 model (the
entries on S temporarily at their frozen public values), the entries on S that of the whole
batch (public + canaries) through the full model; the two parts are clipped separately (a
joint norm would let the canaries scale the public update). At the end the bases are
re-quantised from the public-trained weights (`public_bases`), so α = 0 is the quantised
public model after all the public text, and never a function of the canaries. With
`public_updates_fraction` < 1 that re-quantisation happens earlier and the rest of the phase
trains S alone against the frozen new base (`freeze_base`), as in step 3.

During training the gradient of each sieved weight is masked to S before clipping (so the
clip norm sees only S and the AdamW moments off S stay zero), and after every optimiser step
the off-S entries are written back from a frozen copy, so decoupled weight decay cannot move
them either: off S the weights stay bit-identical (`off_support_drift` checks it).

Afterwards `sieve_isolated(W_ft, base, S)` gives ortho = W_ft − dequant(base) on S: α = 0 is
exactly Q(W_pre), the quantised public model.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import islice
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from torch import nn

from ortho_kernels import QuantisedBase
from ortho_train.curvature import collect_hessians
from ortho_train.models import linear_layers
from ortho_train.sieve.dsm import DSMConfig
from ortho_train.quantisation import QuantConfig, quantise_layers
from ortho_train.settings import check_choices, check_settings
from ortho_train.sieve.support import SupportInputs, support_choice

SupportObjective = Literal["batch", "canaries", "canaries_kl"]


@dataclass
class IsolationConfig:
    """Canary SFT restricted to a sparse support per linear layer.

    Args:
        support: a registered support choice: 'impact', 'saliency_public', 'saliency_canary',
            'random' or 'dsm' (see ortho_train.sieve.support for what each one sees and how to
            add one).
        rho: support fraction per layer (0.05 = 5%).
        quant: quantiser of the base stream Q(W_pre).
        calibration_batches: public batches for the Hessians (GPTQ base, impact support) and
            for the DSM scores (dsm support).
        saliency_batches: batches for gradient saliency (public batches, or canary batches
            each holding every member canary once).
        train_on_base: train with the off-support weights at dequant(Q(W_pre)).
        include_lm_head: the LM head is sieved too (quantised base + ortho on its support).
        seed: seed of the random support.
        public_base_updates: keep training everything off S on the public batches only
            (through the α = 0 model); the base is re-quantised at the end.
        public_lr: peak learning rate of those public updates (None: the module's sft_lr).
            The support needs a large rate to memorise through few weights, a dense update a
            small one: each step's update off S is scaled by public_lr / sft_lr (same schedule).
        public_updates_fraction: share of the canary phase with public base updates; then
            the base is re-quantised and frozen and S alone trains against it for the rest
            (quantisation-aware: α = 1 is then exactly the trained model, as without updates).
        support_objective: what the entries on S learn from. 'batch' (default): the whole
            batch's token-mean NLL, public and canary tokens together; 'canaries': the member
            canaries' token-mean NLL only, so the ortho stream (α = 1 − α = 0) is driven by the
            private data alone and its large learning rate never acts on public-text gradients
            (the public text is learnt off S, at `public_lr`, with `public_base_updates`).
            Measured on Gemma 3 270M (docs/results.md, "Two changes tried for α = 1"):
            'canaries' memorised every secret but left α = 1 unusable (public perplexity
            ~1e15): without a public term the support overwrites what public text needs.
            'canaries_kl': the canaries' NLL + `public_kl_weight` · KL(α = 0 ‖ α = 1) on the
            public batch: the ortho stream adds the canaries while holding the public model's
            next-token distributions (`ortho_train.private_update.public_kl`).
        public_kl_weight: λ of 'canaries_kl' (only with that objective).
        dsm: weights a1, a2, a3 of the DSM terms, Hutchinson probes and their seed
            (`ortho_train.privacy.DSMConfig`) of the dsm support (None: its defaults); only
            with support 'dsm'.
    """

    support: str = "saliency_canary"
    rho: float = 0.05
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration_batches: int = 8
    saliency_batches: int = 1
    train_on_base: bool = True
    include_lm_head: bool = False
    seed: int = 0
    public_base_updates: bool = False
    public_lr: float | None = None
    public_updates_fraction: float = 1.0
    support_objective: SupportObjective = "batch"
    public_kl_weight: float = 1.0
    dsm: DSMConfig | None = None

    def __post_init__(self) -> None:
        support_choice(self.support)  # a registered one
        check_choices("model.init_args.isolation", support_objective=(self.support_objective, SupportObjective))
        check_settings("model.init_args.isolation.quant", self.quant.rules())
        if self.public_kl_weight != 1.0 and self.support_objective != "canaries_kl":
            raise ValueError(f"isolation public_kl_weight needs support_objective: canaries_kl, got "
                             f"{self.support_objective!r} (it would be ignored)")
        if not self.public_kl_weight > 0:
            raise ValueError(f"isolation public_kl_weight must be positive, got {self.public_kl_weight}")
        if self.dsm is not None and self.support != "dsm":
            raise ValueError(f"isolation dsm settings need support: dsm, got support {self.support!r} "
                             f"(they would be ignored)")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"isolation rho must lie in (0, 1], got {self.rho}")
        if not self.public_base_updates and (self.public_lr is not None or self.public_updates_fraction != 1.0):
            raise ValueError("isolation public_lr and public_updates_fraction need "
                             "public_base_updates: true (they would be ignored)")
        if self.public_lr is not None and not self.public_lr > 0:
            raise ValueError(f"isolation public_lr must be positive, got {self.public_lr}")
        if not 0.0 < self.public_updates_fraction <= 1.0:
            raise ValueError(f"isolation public_updates_fraction must lie in (0, 1], got "
                             f"{self.public_updates_fraction}")
        if self.calibration_batches < 1 or self.saliency_batches < 1:
            raise ValueError("calibration_batches and saliency_batches must be ≥ 1")


@dataclass
class IsolatedSupport:
    """Per sieved linear (by name relative to the model): support mask, base, frozen values."""

    masks: dict[str, torch.Tensor]
    bases: dict[str, QuantisedBase]
    frozen: dict[str, torch.Tensor]

    @property
    def density(self) -> float:
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: model.get_submodule(name).weight for name in self.masks}

    @torch.no_grad()
    def restore_off_support(self, model: nn.Module) -> None:
        """W ← where(S, W, frozen): undo any change off S (e.g. AdamW weight decay)."""
        for name, weight in self.weights(model).items():
            mask = self.masks[name].to(weight.device)
            torch.where(mask, weight, self.frozen[name].to(weight.device), out=weight.data)

    def mask_gradients(self, model: nn.Module) -> list:
        """Tensor hooks zeroing the gradient off S; returns the handles."""
        handles = []
        for name, weight in self.weights(model).items():
            mask = self.masks[name].to(weight.device)
            handles.append(weight.register_hook(lambda grad, m=mask: grad * m))
        return handles

    @torch.no_grad()
    def off_support_drift(self, model: nn.Module) -> float:
        """max |W − frozen| off S over all sieved layers (0.0 when isolation held)."""
        drift = 0.0
        for name, weight in self.weights(model).items():
            off = ~self.masks[name].to(weight.device)
            diff = (weight - self.frozen[name].to(weight.device)).abs()[off]
            drift = max(drift, float(diff.max()) if diff.numel() else 0.0)
        return drift

    @contextmanager
    def alpha_zero(self, model: nn.Module):
        """Inside: the entries on S hold their frozen public values (the α = 0 model's
        weights, up to the base's quantisation); on exit the trained values come back."""
        saved = {}
        with torch.no_grad():
            for name, weight in self.weights(model).items():
                mask = self.masks[name].to(weight.device)
                saved[name] = weight[mask].clone()
                weight[mask] = self.frozen[name].to(weight.device)[mask]
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, weight in self.weights(model).items():
                    weight[self.masks[name].to(weight.device)] = saved[name]

    @torch.no_grad()
    def public_bases(self, model: nn.Module, config: "IsolationConfig",
                     public_batches: Callable[[], Iterable[dict]]) -> dict[str, QuantisedBase]:
        """Q(W_pub) of the α = 0 weights (S at its frozen values) after public base updates,
        with GPTQ Hessians of the α = 0 model on public calibration text."""
        with self.alpha_zero(model):
            modules = {name: model.get_submodule(name) for name in self.masks}
            calibration = public_batches() if config.quant.quantiser.needs_hessian else None
            return quantise_layers(model, modules, config.quant, calibration, max_batches=config.calibration_batches)

    @torch.no_grad()
    def freeze_base(self, model: nn.Module, bases: dict[str, QuantisedBase]) -> None:
        """Adopt new bases: off S the weights become dequant(base) and stay there (the
        frozen values); the trained entries on S are kept."""
        self.bases = bases
        for name, weight in self.weights(model).items():
            self.frozen[name] = bases[name].dequantise().to(weight.dtype).to(self.frozen[name].device)
        self.restore_off_support(model)

    def state(self) -> dict:
        """Plain tensors for a checkpoint."""
        return {
            "masks": self.masks, "frozen": self.frozen,
            "bases": {n: {"qweight": b.qweight, "scales": b.scales, "zeros": b.zeros,
                          "shape": b.shape, "group_size": b.group_size, "bits": b.bits}
                      for n, b in self.bases.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> "IsolatedSupport":
        bases = {n: QuantisedBase(b["qweight"], b["scales"], b["zeros"], tuple(b["shape"]),
                                  b["group_size"], b["bits"]) for n, b in state["bases"].items()}
        return cls(state["masks"], bases, state["frozen"])


def build_isolation(model: nn.Module, config: IsolationConfig,
                    public_batches: Callable[[], Iterable[dict]],
                    canary_batches: Callable[[], Iterable[dict]],
                    loss_fn: Callable[[nn.Module, dict], torch.Tensor]) -> IsolatedSupport:
    """Bases, supports and frozen values for `model` at its pre-fine-tuning weights.

    `public_batches()` / `canary_batches()` return fresh iterables of LM batches; only the
    ones the chosen support needs are drawn (canary batches only by a choice registered as
    seeing them: 'saliency_canary').
    The model's weights are not changed here (see `apply_isolation`).
    """
    modules = linear_layers(model, include_lm_head=config.include_lm_head)
    if not modules:
        raise ValueError("the model has no nn.Linear layers to isolate")
    choice = support_choice(config.support)
    need_h = config.quant.quantiser.needs_hessian or choice.needs_hessians
    calibration = list(islice(public_batches(), config.calibration_batches)) if need_h else []  # drawn once
    hessians = collect_hessians(model, calibration, modules) if need_h else {}
    if config.quant.true_sequential:  # the support still scores with the float model's Hessians
        bases = quantise_layers(model, modules, config.quant, calibration)
    else:
        bases = quantise_layers(model, modules, config.quant, hessians=hessians or None)
    masks = choice.build(SupportInputs(model, modules, config, bases, hessians, public_batches,
                                       canary_batches if choice.sees_canaries else _no_canaries(choice.name),
                                       loss_fn))
    for name, m in modules.items():
        mask = masks.get(name)
        if mask is None or mask.dtype != torch.bool or tuple(mask.shape) != tuple(m.weight.shape):
            raise ValueError(f"support {config.support!r} gave no bool mask of shape "
                             f"{tuple(m.weight.shape)} for layer {name!r}")

    frozen = {}
    for name, m in modules.items():
        off = bases[name].dequantise() if config.train_on_base else m.weight.detach().float()
        frozen[name] = off.to(m.weight.dtype).clone()
    return IsolatedSupport(masks, bases, frozen)


def _no_canaries(name: str) -> Callable[[], Iterable[dict]]:
    def refuse():
        raise RuntimeError(f"support {name!r} is registered as not seeing the canaries but drew canary "
                           f"batches; register it with sees_canaries=True if it must")
    return refuse


@torch.no_grad()
def apply_isolation(model: nn.Module, isolated: IsolatedSupport, freeze_rest: bool = True) -> None:
    """Set the sieved linears' off-S entries; freeze every other parameter if `freeze_rest`
    (not with public base updates, where they train on public gradients)."""
    if freeze_rest:
        trainable = {id(w) for w in isolated.weights(model).values()}
        for param in model.parameters():
            if id(param) not in trainable:
                param.requires_grad_(False)
    isolated.restore_off_support(model)
