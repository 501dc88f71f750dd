"""DP-SGD restricted to a private support S: per-example clip, Gaussian noise on S only.

In isolated canary SFT the weights off S only ever see public text, so only the update of S
needs privacy (the principled form of the dual-stream paper's "dual DP"). One step on a
Poisson-sampled batch B of private examples (Abadi et al. 2016, restricted to S):

    g_b   = ∇_θ ℓ(θ; x_b) ⊙ S                                  per example, entries of S only
    ĝ_b   = g_b · min(1, C / (‖g_b‖₂ + 1e-6))                   ‖·‖ over every entry of S
    g̃     = (Σ_b ĝ_b + N(0, σ²C²·I_S)) / (q·n)                  noise on S, 0 off S

with C the clip norm, σ the noise multiplier and q·n the *expected* batch size (dividing by
the realised |B| would leak |B|). The same with S = every trainable weight is the global
baseline (`masks=None`). An empty batch releases noise alone.

Per-example gradients: `torch.func` (`vmap(grad(functional_call(...)))`), not opacus'
`GradSampleModule`. Reasons: it works for any module the loss runs through (Hugging Face
Llama's RMSNorm, rotary embeddings and tied heads need no per-layer grad-sampler rule), it
differentiates exactly the tensors named in the masks (nothing off the trainable set gets
per-example storage), and restricting to S is one gather on the result. Cost: the
per-example gradient of every masked *tensor* is materialised in full, (B, *shape), before
the gather to the entries of S, (B, |S|); `chunk_size` bounds the memory. Norms, clipping,
the sum and the noise then cost O(B·|S|), not O(B·numel). Hugging Face's SDPA mask builder
branches on tensor values (is the padding mask all ones?), which `vmap` cannot trace, so the
model runs with eager attention inside the step (same maths) and is switched back after.

`SupportDPStep` writes g̃ into `.grad` on S and nowhere else: off S an existing `.grad` (the
public gradient, when public base updates run) is kept, a missing one becomes zero there.
The optimiser and the write-back of frozen values off S stay the caller's job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ortho_train.privacy.accounting import (Accountant, PrivacyLedger, calibrate_noise_multiplier,
                                            rdp_epsilon_floor)
from ortho_train.attention import eager_attention
from ortho_train.privacy.poisson import PoissonCanarySampler
from ortho_train.settings import SettingError, check_choices, check_settings

Batch = dict[str, torch.Tensor]
DPScope = Literal["support", "global"]
SCOPES = get_args(DPScope)
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class DPConfig:
    """Settings of DP-SGD on the private support (privacy unit: one member / canary).

    Args:
        target_epsilon: ε to reach at the end of training (σ is calibrated); or None.
        noise_multiplier: σ given directly (noise std σ·C); or None. Exactly one of the two.
        delta: δ of the (ε, δ) guarantee, in (0, 1); at most 1/#members.
        max_grad_norm: C, each example's gradient norm on S is clipped to ≤ C.
        accountant: 'rdp' or 'prv' (opacus' accountants).
        sample_rate: q, each member's inclusion probability per step; or None.
        expected_batch_size: q·n, the expected members per step; or None. Exactly one of the two.
        seed: seed of the noise generator (the sampler takes its own).
        scope: where the private gradient and its noise go in training: 'support' (the private
            support S alone) or 'global' (every trainable weight, the baseline at the same ε).
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = "rdp"
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    seed: int = 0
    scope: DPScope = "support"

    def __post_init__(self) -> None:
        check_choices("model.init_args.dp", scope=(self.scope, DPScope), accountant=(self.accountant, Accountant))
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("dp needs exactly one of target_epsilon and noise_multiplier, got "
                             f"target_epsilon={self.target_epsilon}, noise_multiplier={self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"dp target_epsilon must be positive, got {self.target_epsilon}")
        elif self.target_epsilon is not None and self.accountant == "rdp" and 0.0 < self.delta < 1.0:
            floor = rdp_epsilon_floor(self.delta)  # at start-up: calibration would search σ up to 10⁶ first
            check_settings("model.init_args.dp", [(
                "target_epsilon", self.target_epsilon, self.target_epsilon > floor,
                f"below {floor:.4f}, the least ε the RDP accountant reports at δ = {self.delta:g} for any σ; "
                "raise target_epsilon (or use accountant: prv)")])
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"dp noise_multiplier must be positive, got {self.noise_multiplier}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"dp delta must lie in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"dp max_grad_norm must be positive, got {self.max_grad_norm}")
        if (self.sample_rate is None) == (self.expected_batch_size is None):
            raise ValueError("dp needs exactly one of sample_rate and expected_batch_size, got "
                             f"sample_rate={self.sample_rate}, expected_batch_size={self.expected_batch_size}")
        if self.sample_rate is not None and not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"dp sample_rate must lie in (0, 1], got {self.sample_rate}")
        if self.expected_batch_size is not None and not self.expected_batch_size > 0:
            raise ValueError(f"dp expected_batch_size must be positive, got {self.expected_batch_size}")

    def _calibrate(self, q: float, steps: int) -> float:
        """σ for `target_epsilon`; a budget no σ reaches is refused naming the setting (opacus
        gives up once σ passes 10⁶)."""
        try:
            return calibrate_noise_multiplier(self.target_epsilon, self.delta, q, steps, self.accountant)
        except ValueError as err:
            if "budget is too low" not in str(err):
                raise
            raise SettingError(f"model.init_args.dp.target_epsilon={self.target_epsilon}: not reachable: even "
                               f"σ = 10⁶ spends more over {steps} steps at q = {q:g}, δ = {self.delta:g} "
                               f"({self.accountant}); raise target_epsilon or set noise_multiplier") from None

    def resolve(self, num_members: int, steps: int) -> "DPSchedule":
        """q, q·n and σ for a private set of `num_members` and `steps` DP steps."""
        if num_members < 1:
            raise ValueError(f"dp needs at least one private member, got {num_members}")
        if self.delta > 1.0 / num_members:
            raise ValueError(f"dp delta={self.delta} exceeds 1/#members = 1/{num_members}: a "
                             f"mechanism releasing one member in the clear would satisfy it")
        q = self.sample_rate if self.sample_rate is not None else self.expected_batch_size / num_members
        if not 0.0 < q <= 1.0:
            raise ValueError(f"dp expected_batch_size={self.expected_batch_size} exceeds the "
                             f"{num_members} members (sample rate {q} > 1)")
        sigma = self.noise_multiplier
        if sigma is None:
            sigma = self._calibrate(q, steps)
        return DPSchedule(noise_multiplier=sigma, sample_rate=q, expected_batch_size=q * num_members,
                          num_members=num_members, steps=steps, delta=self.delta,
                          max_grad_norm=self.max_grad_norm, accountant=self.accountant, seed=self.seed)


@dataclass(frozen=True)
class DPSchedule:
    """A `DPConfig` made concrete for one private set and one number of steps."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: float
    num_members: int
    steps: int
    delta: float
    max_grad_norm: float
    accountant: str
    seed: int

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.noise_multiplier, self.sample_rate, self.delta, self.accountant)

    def sampler(self, seed: int | None = None) -> PoissonCanarySampler:
        """Poisson sampler of the members; seed default: the noise seed + 1 (independent draws)."""
        return PoissonCanarySampler(self.num_members, self.sample_rate, self.steps,
                                    self.seed + 1 if seed is None else seed)


@dataclass
class DPStepStats:
    """What one step saw: batch size, per-example norms on S before clipping, noise std."""

    batch_size: int
    mean_grad_norm: float
    max_grad_norm: float
    clipped_fraction: float
    noise_std: float


def clip_per_example(grads: dict[str, torch.Tensor], max_grad_norm: float
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ĝ_b = g_b · min(1, C / (‖g_b‖ + 1e-6)) with ‖g_b‖² = Σ_tensors Σ_entries g_b²;
    grads are (B, ...) per tensor, holding the entries of S only. Returns (ĝ, ‖g_b‖ (B,))."""
    squares = [g.flatten(1).float().square().sum(dim=1) for g in grads.values()]  # each (B,)
    norms = torch.stack(squares).sum(dim=0).sqrt()  # (B,)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # (B,)
    clipped = {n: g * factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}
    return clipped, norms


class _LossOf(nn.Module):
    """loss_fn(model, batch) as a module, so `functional_call` can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def batch_size_of(batch: Batch | None) -> int:
    """The common leading dimension of a batch's tensors (0 for None or an empty dict)."""
    if not batch:
        return 0
    sizes = {int(t.shape[0]) for t in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


class SupportDPStep:
    """One DP-SGD gradient on the support S of a model (see the module docstring).

        step = SupportDPStep(model, masks, loss_fn, max_grad_norm=1.0, noise_multiplier=1.1,
                             expected_batch_size=5.0, seed=0)
        stats = step(batch)          # .grad = g̃ on S; then optimizer.step(); ledger.step()

    Args:
        model: any module; `loss_fn(model, batch)` must give the mean loss of a batch of one
            example (the step calls it per example, with a leading batch dimension of 1).
        masks: parameter name (as in `model.named_parameters()`) -> bool mask of its shape,
            the private support S; None: every trainable parameter in full (global DP-SGD).
        max_grad_norm: C. noise_multiplier: σ. expected_batch_size: q·n, the divisor.
        seed: seed of the noise generator. chunk_size: examples per vmap chunk (memory).
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None, loss_fn: LossFn, *,
                 max_grad_norm: float, noise_multiplier: float, expected_batch_size: float,
                 seed: int = 0, chunk_size: int | None = None):
        if not max_grad_norm > 0 or not noise_multiplier >= 0 or not expected_batch_size > 0:
            raise ValueError(f"dp needs max_grad_norm > 0, noise_multiplier ≥ 0 and expected_batch_size"
                             f" > 0, got {max_grad_norm}, {noise_multiplier}, {expected_batch_size}")
        self.model = model
        self.masks = self._check_masks(model, masks)
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.chunk_size = chunk_size
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._index = {name: None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
                       for name, mask in self.masks.items()}  # flat positions of S per tensor
        self._loss = _LossOf(model, loss_fn)

    @classmethod
    def from_schedule(cls, model: nn.Module, masks: dict[str, torch.Tensor] | None, loss_fn: LossFn,
                      schedule: DPSchedule, chunk_size: int | None = None) -> "SupportDPStep":
        return cls(model, masks, loss_fn, max_grad_norm=schedule.max_grad_norm,
                   noise_multiplier=schedule.noise_multiplier,
                   expected_batch_size=schedule.expected_batch_size, seed=schedule.seed,
                   chunk_size=chunk_size)

    @staticmethod
    def _check_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None
                     ) -> dict[str, torch.Tensor | None]:
        params = dict(model.named_parameters())
        if masks is None:
            out = {name: None for name, p in params.items() if p.requires_grad}
            if not out:
                raise ValueError("dp: the model has no trainable parameter")
            return out
        if not masks:
            raise ValueError("dp: the support masks are empty (None means every trainable weight)")
        for name, mask in masks.items():
            if name not in params:
                raise ValueError(f"dp: support mask {name!r} names no parameter of the model "
                                 f"(keys are parameter names, e.g. 'model.layers.0.mlp.up_proj.weight')")
            if mask.dtype != torch.bool or mask.shape != params[name].shape:
                raise ValueError(f"dp: support mask {name!r} must be bool {tuple(params[name].shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        return {name: mask.to(params[name].device) for name, mask in masks.items()}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def validate(self, batch: Batch) -> None:
        """Start-up check on the first example of a batch: per-example gradients of this model
        and loss can be computed (no data-dependent control flow under vmap) and are finite."""
        if not batch_size_of(batch):
            raise ValueError("dp: validation needs a non-empty batch of private examples")
        try:
            grads = self.per_example_grads({k: v[:1] for k, v in batch.items()})
        except RuntimeError as err:
            raise ValueError(f"dp cannot compute per-example gradients of this model and loss "
                             f"with torch.func vmap(grad): {err}") from err
        bad = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
        if bad:
            raise ValueError(f"dp: non-finite per-example gradients in {bad[:3]}")

    def per_example_grads(self, batch: Batch) -> dict[str, torch.Tensor]:
        """∇ℓ(θ; x_b) on S per example: (B, |S_p|) per masked parameter p, the entries of S in
        row-major order (all entries, (B, numel), for an unmasked parameter)."""
        params = dict(self.model.named_parameters())
        inputs = {f"model.{name}": params[name].detach() for name in self.masks}

        def loss_one(p: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
            example = {k: v.unsqueeze(0) for k, v in example.items()}  # (1, ...) each
            return functional_call(self._loss, p, (example,), strict=False)

        per_example = vmap(grad(loss_one), in_dims=(None, 0), randomness="different",
                           chunk_size=self.chunk_size)
        with torch.no_grad(), eager_attention(self.model):
            grads = per_example(inputs, batch)
        out = {}
        for name, index in self._index.items():
            g = grads[f"model.{name}"].flatten(1)  # (B, numel)
            out[name] = g if index is None else g.index_select(1, index)  # (B, |S_p|)
        return out

    def private_gradient(self, batch: Batch | None) -> tuple[dict[str, torch.Tensor], DPStepStats]:
        """g̃ = (Σ_b ĝ_b + N(0, σ²C²) on S) / (q·n) per masked parameter: dense, zero off S."""
        params = dict(self.model.named_parameters())
        size = batch_size_of(batch)
        std = self.noise_multiplier * self.max_grad_norm
        if size:
            clipped, norms = clip_per_example(self.per_example_grads(batch), self.max_grad_norm)
            summed = {name: g.sum(dim=0) for name, g in clipped.items()}  # (|S_p|,) each
            stats = DPStepStats(size, float(norms.mean()), float(norms.max()),
                                float((norms > self.max_grad_norm).float().mean()), std)
        else:
            summed = {name: None for name in self.masks}
            stats = DPStepStats(0, 0.0, 0.0, 0.0, std)
        out = {}
        for name, index in self._index.items():
            p = params[name]
            count = p.numel() if index is None else index.numel()
            total = torch.randn(count, generator=self._generator(p.device), device=p.device,
                                dtype=p.dtype) * std  # (|S_p|,) noise on S only
            if summed[name] is not None:
                total += summed[name]
            total /= self.expected_batch_size
            if index is None:
                out[name] = total.reshape(p.shape)
            else:
                out[name] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device).index_copy_(
                    0, index, total).reshape(p.shape)  # (numel,) -> param shape
        return out, stats

    @torch.no_grad()
    def write_grads_(self, grads: dict[str, torch.Tensor]) -> None:
        """`.grad` ← g̃ on S; off S an existing `.grad` is kept, a missing one is zero there."""
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            p, g = params[name], grads[name].to(params[name].dtype)
            if p.grad is None or mask is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(torch.where(mask, g, p.grad))

    def state_dict(self) -> dict:
        """Noise generator states per device, for a checkpoint: a resumed run must not replay
        noise it already released (the accountant assumes independent draws)."""
        return {"seed": self.seed, "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self._generators = {}
        for device, rng_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(rng_state)

    def __call__(self, batch: Batch | None) -> DPStepStats:
        grads, stats = self.private_gradient(batch)
        self.write_grads_(grads)
        return stats


def module_masks_to_params(masks: dict[str, torch.Tensor], suffix: str = "weight") -> dict[str, torch.Tensor]:
    """Support masks keyed by module name (as isolation keeps them) -> by parameter name."""
    return {f"{name}.{suffix}": mask for name, mask in masks.items()}
