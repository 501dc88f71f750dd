"""K-FAC Kronecker factors of the `nn.Linear` layers of a model, from hooks.

For a linear layer s = W a (+ b) applied to every token t of a batch, K-FAC approximates the
layer's Fisher as a Kronecker product F ≈ A ⊗ G of

    A = 1/N · Σ_t a_t a_tᵀ          (d_in × d_in, or (d_in+1)² with a ones column for the bias)
    G = 1/N · Σ_t g_t g_tᵀ          (d_out × d_out)

over the N counted tokens (tokens flattened, pads masked). Conventions, exactly:

* a_t is the layer input at token t; with a bias, a_t = [x_t, 1] (the ones column is *last*,
  so the bias is the last column of the augmented weight [W, b]). Each batch's Gram matrices
  are computed in (at least) float32 and summed in float64.
* g_t = ∂(Σ_u ℓ_u)/∂s_t is the gradient of the *summed* per-term loss at token t's output.
  Training backpropagates a mean-reduced loss L = 1/M Σ_u ℓ_u (M = `num_loss_terms`, the
  number of terms the loss averages over) scaled by `grad_scale` (AMP's loss scale, or 1/k
  for a loss divided over k accumulation micro-batches), so the hook sees
  grad_scale/M · g_t and multiplies by M/grad_scale. M defaults to the number of tokens the
  token mask keeps. This is the "empirical" Fisher (real labels) with curvlinops' KFAC-expand
  convention for a mean-reduced loss; for a causal LM M is the number of scored *labels*
  (one fewer per sequence than attended tokens), so pass it when it matters.
* Only the tokens with `set_token_mask(mask)` True count, in A, G and N alike. A counted token
  whose output reaches no loss term (a causal LM's last position) has g_t = 0 and still
  counts in N, as in curvlinops.

Statistics are paired per forward call: the input Gram matrix is computed in the forward
pre-hook (so activations need not be kept until backward) and added together with the
output-gradient Gram matrix only when a gradient reaches that call's output (a tensor hook
on the output, not a full backward hook: those break on in-place ops). This also handles
activation checkpointing, whose recomputation fires forward hooks a second time: only one of
the two forward calls (the one backward flows through) is counted. Forward calls without a
backward (validation, `torch.no_grad`) count nothing.

EMA: `step()` (once per optimiser step) folds the statistics gathered since the last step,
batch_A = Σ a aᵀ / N (N over all micro-batches of the step), into
A_n = ema·A_{n−1} + (1−ema)·batch_A, *started from the first batch* (A_1 = batch_A; never
from the identity, no bias correction needed). Same for G.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ortho_train.models import eval_mode, linear_layers


@dataclass
class KFACFactors:
    """The Kronecker factors of one linear layer.

    Attributes:
        A: (d_in, d_in), or (d_in+1, d_in+1) with a bias (ones column last), float64.
        G: (d_out, d_out) float64.
        num_updates: optimiser steps (or collection rounds) folded into A and G.
        has_bias: whether A carries the ones column.
    """

    A: Tensor
    G: Tensor
    num_updates: int
    has_bias: bool = False


@dataclass
class _TokenContext:
    """The token mask and loss-term count of the batch whose forward is running."""

    mask: Tensor | None = None
    num_loss_terms: int | None = None
    all_kept: bool = False  # the mask keeps every token: skip the (copying) selection


@dataclass
class _Sums:
    """Σ a aᵀ, Σ g gᵀ (float64) and the token count since the last `step()`."""

    a: Tensor
    g: Tensor
    tokens: int = 0


def _gram(rows: Tensor) -> Tensor:
    """rowsᵀ rows in at least float32, returned in float64."""
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    return (rows.T @ rows).double()


class KFACCollector:
    """EMA of K-FAC factors of chosen linear layers, fed by hooks during training.

        collector = KFACCollector(model)            # all linears but the LM head
        with collector:
            for batch in loader:
                collector.set_token_mask(batch["attention_mask"])
                nll_sum, n_labels = ...             # forward
                collector.set_num_loss_terms(n_labels)   # M, known after the forward
                (nll_sum / n_labels).backward(); optimizer.step(); collector.step()
        factors = collector.factors()               # {name: KFACFactors}

    Args:
        model: the network; only used to find layers when `layers` is None.
        layers: {name: nn.Linear}; default `linear_layers(model)`.
        ema: weight of the old factors in A_n = ema·A_{n−1} + (1−ema)·batch_A, in [0, 1).
        grad_scale: factor the backpropagated mean loss was multiplied by (AMP loss scale);
            read when the gradient arrives, so set the attribute of the same name before
            each backward when it changes.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Linear] | None = None,
                 ema: float = 0.95, grad_scale: float = 1.0):
        self.layers = linear_layers(model) if layers is None else dict(layers)
        if not self.layers:
            raise ValueError("KFACCollector: no nn.Linear layers to collect factors for")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"KFACCollector: ema must be in [0, 1), got {ema}")
        self.ema = ema
        self.grad_scale = grad_scale
        self._sums = {name: self._zero_sums(m) for name, m in self.layers.items()}
        self._factors: dict[str, KFACFactors] = {}
        self._context = _TokenContext()
        self._in_flight: dict[str, tuple] = {}
        self._handles: list = []

    @staticmethod
    def _zero_sums(module: nn.Linear) -> _Sums:
        d_in = module.in_features + (module.bias is not None)
        device = module.weight.device
        return _Sums(torch.zeros(d_in, d_in, dtype=torch.float64, device=device),
                     torch.zeros(module.out_features, module.out_features, dtype=torch.float64,
                                 device=device))

    # ------------------------------------------------------------------ per batch
    def set_token_mask(self, mask: Tensor | None, num_loss_terms: int | None = None) -> None:
        """Tokens to count in the next forward passes: bool/0-1 (B, T), None = all.

        `num_loss_terms` is M of the mean-reduced loss (see the module docstring); None means
        the number of True entries of `mask` (or of all tokens a layer sees, without a mask).
        """
        if mask is None:
            self._context = _TokenContext()
        else:
            mask = mask.detach().bool()
            kept = int(mask.sum())
            self._context = _TokenContext(mask, all_kept=kept == mask.numel())
            num_loss_terms = kept if num_loss_terms is None else num_loss_terms
        self.set_num_loss_terms(num_loss_terms)

    def set_num_loss_terms(self, num_loss_terms: int | None) -> None:
        """M of the batch whose forward ran last; may be given after the forward, before backward."""
        if num_loss_terms is not None and num_loss_terms <= 0:
            raise ValueError(f"num_loss_terms must be positive, got {num_loss_terms}")
        self._context.num_loss_terms = num_loss_terms

    @staticmethod
    def _rows(name: str, t: Tensor, context: _TokenContext) -> Tensor:
        rows = t.detach().reshape(-1, t.shape[-1])  # (B*T, d)
        mask = context.mask
        if mask is None:
            return rows
        if mask.numel() != rows.shape[0]:
            raise ValueError(f"KFACCollector: token mask {tuple(mask.shape)} does not match layer "
                             f"{name!r}'s {rows.shape[0]} tokens (input {tuple(t.shape)})")
        return rows if context.all_kept else rows[mask.reshape(-1).to(rows.device)]  # (kept, d)

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Linear, args) -> None:
            if not torch.is_grad_enabled():
                return  # no gradient can reach this call (e.g. reentrant checkpoint's first pass)
            context = self._context
            rows = self._rows(name, args[0], context)  # (N, d_in)
            if module.bias is not None:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)  # (N, d_in+1)
            self._in_flight[name] = (_gram(rows), rows.shape[0], context)
        return hook

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Linear, args, output: Tensor) -> None:
            pending = self._in_flight.pop(name, None)
            if pending is None or not output.requires_grad:
                return
            output.register_hook(self._grad_hook(name, *pending))
        return hook

    def _grad_hook(self, name: str, gram_a: Tensor, tokens: int, context: _TokenContext) -> Callable:
        def hook(grad: Tensor) -> None:
            rows = self._rows(name, grad, context)  # (N, d_out)
            m = rows.shape[0] if context.num_loss_terms is None else context.num_loss_terms
            sums = self._sums[name]
            sums.a += gram_a
            per_token = rows.to(torch.promote_types(rows.dtype, torch.float32)) * (m / self.grad_scale)
            sums.g += _gram(per_token)  # per-token gradient of Σ ℓ, scaled before squaring
            sums.tokens += tokens
        return hook

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> "KFACCollector":
        if self._handles:
            raise RuntimeError("KFACCollector is already attached")
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._in_flight.clear()

    def __enter__(self) -> "KFACCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ EMA
    def step(self) -> int:
        """Fold the statistics since the last call into the EMA; returns layers updated.

        A layer that saw no counted token since the last step keeps its factors.
        """
        updated = 0
        for name, sums in self._sums.items():
            if sums.tokens == 0:
                continue
            batch_a, batch_g = sums.a / sums.tokens, sums.g / sums.tokens
            old = self._factors.get(name)
            if old is None:  # started from the first batch, not from the identity
                self._factors[name] = KFACFactors(batch_a, batch_g, 1,
                                                  self.layers[name].bias is not None)
            else:
                old.A = self.ema * old.A + (1.0 - self.ema) * batch_a
                old.G = self.ema * old.G + (1.0 - self.ema) * batch_g
                old.num_updates += 1
            self._sums[name] = self._zero_sums(self.layers[name])
            updated += 1
        return updated

    def factors(self) -> dict[str, KFACFactors]:
        """{layer name: KFACFactors} (copies); raises if a layer was never updated."""
        missing = [name for name in self.layers if name not in self._factors]
        if missing:
            raise ValueError(f"no K-FAC statistics for {missing[:3]}{'…' if len(missing) > 3 else ''}: "
                             "run a forward and backward with the collector attached, then step()")
        return {name: KFACFactors(f.A.clone(), f.G.clone(), f.num_updates, f.has_bias)
                for name, f in self._factors.items()}

    def state_dict(self) -> dict:
        return {"ema": self.ema, "factors": {n: vars(f) for n, f in self.factors().items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.ema = state["ema"]
        self._factors = {n: KFACFactors(**f) for n, f in state["factors"].items()}


@contextmanager
def _scratch_grads(model: nn.Module, layers: dict[str, nn.Linear]) -> Iterator[None]:
    """Backward passes that leave every `.grad` and `requires_grad` as they were.

    The layers' weights require grad for the duration (so their outputs get a gradient even
    in a frozen model). `loss.backward()` rather than `torch.autograd.grad`, because reentrant
    activation checkpointing supports only the former.
    """
    switched = [m.weight for m in layers.values() if not m.weight.requires_grad]
    for w in switched:
        w.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
        for w in switched:
            w.requires_grad_(False)


def collect_kfac(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
                 loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], tuple[Tensor, Tensor | int]],
                 layers: dict[str, nn.Linear] | None = None) -> dict[str, KFACFactors]:
    """Plain (token-weighted) averages of A and G over `batches`, standalone.

    Each batch is a mapping with `input_ids` (B, T) and optionally `attention_mask` (B, T)
    (the token mask); it is moved to the model's device. `loss_fn(model, batch)` returns
    (summed loss, number of loss terms M), and the mean Σℓ/M is backpropagated. Every `.grad`
    is restored afterwards; the model runs in eval mode (no dropout); frozen layer weights
    require grad for the duration.
    """
    layers = linear_layers(model) if layers is None else layers
    device = next(model.parameters()).device
    collector = KFACCollector(model, layers, ema=0.0)
    seen = 0
    with eval_mode(model), _scratch_grads(model, layers), collector:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            collector.set_token_mask(batch.get("attention_mask"))
            total, terms = loss_fn(model, batch)
            terms = int(terms)
            collector.set_num_loss_terms(terms)
            (total / terms).backward()
            seen += 1
    if seen == 0:
        raise ValueError("collect_kfac: no batches (the DataLoader is empty)")
    collector.step()  # one fold with ema=0: the plain average over all batches
    return collector.factors()
