"""Per-layer curvature from calibration text: the GPTQ Hessian of every `nn.Linear`.

For a linear layer y = x Wᵀ and the layer-wise objective ‖(W' − W) X‖², the Hessian with
respect to one row of W is (docs/methods.md §3)

    H = 2/N · Σ_t x_t x_tᵀ            (d_in × d_in, N = number of *tokens*, pads masked)

accumulated as a running mean, H_n+m = n/(n+m)·H_n + 2/(n+m)·Σ_batch x xᵀ, so it does not
depend on how the calibration text is batched. Departure from reference GPTQ: it counts
*sequences* (its H is 2T·A for T tokens per sequence); we count tokens, so H does not grow
with the sequence length. Damping and dead columns are handled by `prepare_hessian`.

Two ways in: `HessianCollector` (forward pre-hooks on a model, usable from a callback or a
LightningModule, the caller tells it the token mask of each batch) and `collect_hessians`
(standalone over a DataLoader of `{"input_ids", "attention_mask"}` batches). Activation
checkpointing would fire the hooks twice per forward: collect under `torch.no_grad()`.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ortho_train.hooks import LayerInputHooks
from ortho_train.models import eval_mode, linear_layers


class HessianAccumulator:
    """Running mean H = 2/N Σ x xᵀ over the tokens seen by one layer."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the tokens of x (..., d_in); `mask` (...,) keeps the True/1 positions."""
        d = self.hessian.shape[0]
        if x.shape[-1] != d:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator {d}")
        rows = x.reshape(-1, d)  # (tokens, d_in)
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"token mask {tuple(mask.shape)} does not match the input's "
                                 f"leading shape {tuple(x.shape[:-1])}")
            rows = rows[mask.reshape(-1).bool()]  # (kept, d_in)
        m = rows.shape[0]
        if m == 0:
            return
        rows = rows.to(self.hessian.dtype)
        total = self.tokens + m
        self.hessian.mul_(self.tokens / total)
        self.hessian.addmm_(rows.T, rows, alpha=2.0 / total)  # += 2/(n+m) · XᵀX
        self.tokens = total


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns and damping, as GPTQ does before inverting (returns a new fp32/fp64 H).

    dead_j = (H_jj == 0): the input feature never fired on calibration data; its row and
    column are zero, so H is singular. Set H_jj = 1 (no coupling to other columns).
    Damping: H += damp · mean(diag H) · I, which keeps the Cholesky factorisation stable.

    Returns (H_prepared (K, K), dead (K,) bool).
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (K, K), got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or Inf (calibration activations overflowed?)")
    if damp < 0:
        raise ValueError(f"damp must be ≥ 0, got {damp}")
    h = hessian.double() if hessian.dtype == torch.float64 else hessian.float()
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    return h, dead


def inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with H⁻¹ = Uᵀ U (GPTQ's 'Cholesky of the inverse', upper form).

    U_jj² is the conditional variance used in the GPTQ sweep and in SpQR's outlier test.
    """
    try:
        chol = torch.linalg.cholesky(hessian)
        hinv = torch.cholesky_inverse(chol)
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError("the damped Hessian is not positive definite; raise `damp`") from err


class HessianCollector(LayerInputHooks):
    """Forward pre-hooks accumulating the GPTQ Hessian of chosen linear layers.

        with HessianCollector(model) as collector:
            for batch in loader:
                collector.token_mask = batch["attention_mask"]
                model(**batch)
        hessians = collector.hessians()

    The hooks mask pad tokens with `token_mask` (B, T) when it is set and matches the
    layer input's leading shape (B, T).
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(linear_layers(model) if modules is None else modules)
        if not self.modules:
            raise ValueError("no nn.Linear layers to collect Hessians for")
        self.accumulators = {
            name: HessianAccumulator(m.in_features, dtype, m.weight.device)
            for name, m in self.modules.items()
        }

    def observe(self, name: str, x: torch.Tensor) -> None:
        mask = self.token_mask
        if mask is not None:
            mask = mask.to(x.device)
        self.accumulators[name].add(x, mask)

    @property
    def tokens(self) -> int:
        return min(acc.tokens for acc in self.accumulators.values())

    def hessians(self) -> dict[str, torch.Tensor]:
        """The accumulated H per layer name; raises if no token was seen."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached the hooked layers: the calibration "
                             "data is empty or fully masked")
        return {name: acc.hessian for name, acc in self.accumulators.items()}


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                     modules: dict[str, nn.Linear] | None = None, max_batches: int | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """GPTQ Hessians of `modules` (default: all linears but the LM head) over `batches`.

    Each batch is a dict with `input_ids` (B, T) and optionally `attention_mask` (B, T);
    masked positions are not counted. Raises `ValueError` when no batch or token arrives.
    """
    device = next(model.parameters()).device
    seen = 0
    with eval_mode(model), HessianCollector(model, modules, dtype) as collector:
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            collector.token_mask = mask
            model(input_ids=ids, attention_mask=mask)
            seen += 1
        if seen == 0:
            raise ValueError("no calibration batches: the calibration DataLoader is empty")
        return collector.hessians()
