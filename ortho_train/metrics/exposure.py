"""Exposure of planted canaries (Carlini et al. 2019, "The Secret Sharer").

The log-perplexity of a secret s = (s_1..s_S) after its prefix is

    Px(s) = −Σ_t log2 p(s_t | prefix, s_<t)        (bits; secret tokens only)

and exposure measures how far the canary's Px sits below that of other secrets drawn from the
same randomness space. With a reference sample R_ref of such secrets (never trained):

* rank estimate:  exposure = log2|R_ref| − log2 rank,  rank = 1 + #{r ∈ R_ref : Px(r) < Px(s)}.
  The paper ranks the canary inside the full space R (rank 1 ⇒ log2|R|); here the space is
  replaced by the sample, so the estimate caps at log2|R_ref| (a canary more likely than every
  reference gets exactly log2|R_ref|; one in the middle gets ≈ 1). Ties count in the canary's
  favour (strictly lower only).
* extrapolation (paper §4.3): fit a skew-normal to {Px(r)} and use
  exposure = −log2 CDF(Px(s)), evaluated as −logcdf / ln 2 so it stays finite far in the tail.

Speed: :func:`secret_log_perplexity` runs the shared prefix once and reuses its KV cache for
every candidate batch, so each candidate costs at most S − 1 token positions instead of
P + S − 1; candidates sharing leading tokens share the pass over them.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
from scipy import integrate, special, stats
from torch import Tensor, nn

from ortho_train.metrics.kv_cache import last_position_kwargs, returned_cache
from ortho_train.metrics.scoring import batch_within_budget, position_logprobs
from ortho_train.models import eval_mode

_LN2 = math.log(2.0)
MIN_SKEWNORM_REFERENCES = 100  # below this the fitted tail is a guess, not an estimate


class ExposureEstimateError(ValueError):
    """The skew-normal extrapolation cannot be trusted here (too few references, failed fit)."""


def _as_1d_float64(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _row_logprob_sums(model: nn.Module, ids: Tensor, targets: Tensor, cache=None) -> Tensor:
    """Σ_t log p(targets_t) where ids (b, n) position t predicts targets (b, n); float32 (b,).

    After the KV `cache` if given (extended in place); through `metrics.scoring`, so a large
    vocabulary never holds the (b, n, V) logits.
    """
    b, n = ids.shape
    position = torch.arange(b * n, device=ids.device)  # every position of the (b, n) grid
    logp, _ = position_logprobs(model, ids, position, targets.reshape(-1), cache)  # (b·n,)
    return logp.view(b, n).sum(dim=-1)  # (b·n,) -> (b, n) -> (b,)


def _shared_head_length(rows: Tensor) -> int:
    """Head length h minimising the tokens fed for sorted rows (b, S): h·#heads + (S−1−h)·b.

    Candidates that share their first h tokens share one forward pass over them (their
    "head"); the remaining S−1−h tokens are fed per candidate on a copy of the head's cache.
    """
    b, secret_len = rows.shape
    best_h, best_cost = 0, (secret_len - 1) * b
    for h in range(1, secret_len):
        n_heads = 1 + int((rows[1:, :h] != rows[:-1, :h]).any(dim=1).sum())
        cost = h * n_heads + (secret_len - 1 - h) * b
        if cost < best_cost:
            best_h, best_cost = h, cost
    return best_h


def _chunk_logprob_cached(model: nn.Module, prefix_cache, first_logp: Tensor,
                          rows: Tensor) -> Tensor:
    """Σ_t log p(s_t | prefix, s_<t) in nats for sorted rows (b, S), reusing the prefix cache."""
    b, secret_len = rows.shape
    logp = first_logp[rows[:, 0]]  # (b,) log p(s_1 | prefix)
    if secret_len == 1:
        return logp
    h = _shared_head_length(rows)
    cache = copy.deepcopy(prefix_cache)  # forward passes append to it in place
    if h == 0:
        cache.batch_repeat_interleave(b)
        return logp + _row_logprob_sums(model, rows[:, :-1], rows[:, 1:], cache)
    # (u, h) distinct heads and, for each of the b rows, the index of its head
    heads, head_of_row = torch.unique_consecutive(rows[:, :h], dim=0, return_inverse=True)
    u = heads.shape[0]
    cache.batch_repeat_interleave(u)
    # One pass over the heads scores s_2..s_h within each head (position j predicts s_{j+2}) and
    # s_{h+1} of every row at its head's last position; positions index the flat (u·h) grid.
    within = (torch.arange(u, device=rows.device)[:, None] * h
              + torch.arange(h - 1, device=rows.device)).reshape(-1)  # (u, h-1) -> (u·(h-1),)
    after = head_of_row * h + (h - 1)  # (b,)
    targets = torch.cat([heads[:, 1:].reshape(-1), rows[:, h]])  # (u·(h-1) + b,)
    scored, cache = position_logprobs(model, heads, torch.cat([within, after]), targets, cache)
    within_head = scored[:within.numel()].view(u, h - 1).sum(-1)  # (u·(h-1),) -> (u, h-1) -> (u,)
    logp = logp + within_head[head_of_row] + scored[within.numel():]
    if h < secret_len - 1:
        cache.batch_select_indices(head_of_row)  # (u, ...) -> (b, ...)
        logp = logp + _row_logprob_sums(model, rows[:, h:-1], rows[:, h + 1:], cache)
    return logp


def _chunk_logprob_uncached(model: nn.Module, prefix: Tensor, first_logp: Tensor, rows: Tensor) -> Tensor:
    """The same sum for rows (b, S), running the prefix (1, P) again in front of every row."""
    b, secret_len = rows.shape
    logp = first_logp[rows[:, 0]]  # (b,) log p(s_1 | prefix)
    if secret_len == 1:
        return logp
    ids = torch.cat([prefix.expand(b, -1), rows[:, :-1]], dim=1)  # (b, P+S-1)
    width, start = ids.shape[1], prefix.shape[1]
    position = (torch.arange(b, device=ids.device)[:, None] * width
                + torch.arange(start, width, device=ids.device)).reshape(-1)  # (b·(S-1),) secret positions
    scored, _ = position_logprobs(model, ids, position, rows[:, 1:].reshape(-1))  # (b·(S-1),)
    return logp + scored.view(b, secret_len - 1).sum(-1)  # (b·(S-1),) -> (b, S-1) -> (b,)


@torch.no_grad()
def secret_log_perplexity(model: nn.Module, prefix_ids: Tensor, candidate_ids: Tensor,
                          batch_size: int = 1024, reuse_prefix_cache: bool = True) -> Tensor:
    """Log-perplexity in bits of each candidate secret after one shared prefix.

    ``Px(s) = −Σ_{t=1..S} log2 p(s_t | prefix, s_<t)`` — the prefix tokens are conditioned on,
    not scored (Carlini et al. 2019, "The Secret Sharer", §3).

    How the work is shared (the answer does not depend on it, up to float32 rounding):

    * the prefix runs once; the distribution of s_1 comes from that run;
    * with ``reuse_prefix_cache`` its KV cache is copied across each candidate batch
      (``Cache.batch_repeat_interleave``), so a candidate costs S−1 token positions instead of
      P+S−1 (≈ 4× faster for P=35, S=10);
    * duplicate candidates are scored once, and the rest are sorted so that candidates sharing
      their first h tokens share one pass over them; h is picked per batch to minimise the
      tokens fed (for 10⁴ random 10-digit secrets h = 3, ≈ 30% fewer tokens);
    * without ``reuse_prefix_cache`` the prefix is re-run for every candidate (for models
      whose cache cannot be copied).

    Args:
        model: Hugging Face style causal LM (``.logits`` and a KV cache, `metrics.kv_cache`).
        prefix_ids: (P,) or (1, P) prefix token ids, P ≥ 1.
        candidate_ids: (R, S) candidate secrets (e.g. the canary and the references).
        batch_size: candidates per forward pass; 1024 suits a few-million-parameter model on
            CPU (memory ≈ batch · layers · 2 · (P+S) · hidden · 4 bytes for the KV cache); capped
            so that the batch's logits fit `LOGIT_BUDGET_BYTES` where the head cannot be
            chunked (`metrics.scoring.batch_within_budget`).
        reuse_prefix_cache: see above.

    Returns:
        (R,) float64 tensor of log-perplexities in bits, on CPU.
    """
    prefix = prefix_ids.reshape(1, -1)  # (1, P)
    if prefix.shape[1] == 0:
        raise ValueError("secret_log_perplexity needs a non-empty prefix")
    if candidate_ids.ndim != 2:
        raise ValueError(f"candidate_ids must be (R, S), got {tuple(candidate_ids.shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    prefix = prefix.to(device)
    # Sorted unique rows: shared heads become contiguous, duplicates are scored once.
    unique, inverse = torch.unique(candidate_ids.to(device), dim=0, return_inverse=True)  # (U, S)
    batch_size = batch_within_budget(model, batch_size, candidate_ids.shape[1])

    with eval_mode(model):
        out = model(prefix, use_cache=reuse_prefix_cache, **last_position_kwargs(model))  # logits (1, 1, V)
        first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,) for s_1
        prefix_cache = returned_cache(out) if reuse_prefix_cache else None
        del out
        unique_result = torch.empty(unique.shape[0], dtype=torch.float64)
        for start in range(0, unique.shape[0], batch_size):
            rows = unique[start:start + batch_size]  # (b, S)
            b = rows.shape[0]
            if reuse_prefix_cache:
                logp = _chunk_logprob_cached(model, prefix_cache, first_logp, rows)
            else:
                logp = _chunk_logprob_uncached(model, prefix, first_logp, rows)
            unique_result[start:start + b] = (-logp.double() / _LN2).cpu()
    return unique_result[inverse.cpu()]


def exposure_from_rank(canary_logppl, reference_logppl) -> Tensor:
    """Rank-based exposure ``log2|R_ref| − log2 rank`` (Carlini et al. 2019, §4.2).

    ``rank = 1 + #{r : Px(r) < Px(canary)}`` (strict, so ties favour the canary). The most
    likely possible canary gets exactly ``log2|R_ref|``; a canary at the reference median gets
    ``log2|R_ref| − log2(|R_ref|/2 + 1) ≈ 1``; the least likely gets ``≈ 0``. The estimate is
    only resolved down to 1/|R_ref|: use ≳ 1e4 references, or :func:`exposure_from_skewnorm`
    to extrapolate beyond the cap.

    Args:
        canary_logppl: (C,) canary log-perplexities (any units, same as the references).
        reference_logppl: (R,) reference log-perplexities.

    Returns:
        (C,) float64 tensor.
    """
    canary = _as_1d_float64(canary_logppl)
    reference = np.sort(_as_1d_float64(reference_logppl))
    if reference.size == 0:
        raise ValueError("exposure_from_rank needs at least one reference")
    if np.isnan(reference).any() or np.isnan(canary).any():
        raise ValueError("exposure_from_rank: NaN log-perplexity")
    rank = 1 + np.searchsorted(reference, canary, side="left")  # side=left ⇒ strictly lower
    return torch.from_numpy(np.log2(reference.size) - np.log2(rank.astype(np.float64)))


def fit_skewnorm(reference_logppl) -> tuple[float, float, float]:
    """Maximum-likelihood skew-normal fit ``(a, loc, scale)`` started at the moment estimates.

    Starting values (method of moments, skewness clipped to ±0.99 because a skew-normal cannot
    exceed ≈ 0.995): with sample skewness γ, solve γ = (4−π)/2 · b³/(1−b²)^{3/2} for
    b = δ·sqrt(2/π); then a = δ/sqrt(1−δ²), scale ω = std/sqrt(1−2δ²/π),
    loc ξ = mean − ω·δ·sqrt(2/π). Without a start, the optimiser can wander off for samples
    with little skew.
    """
    x = _as_1d_float64(reference_logppl)
    if x.size < 3 or not np.isfinite(x).all():
        raise ValueError("fit_skewnorm needs ≥ 3 finite references")
    mean, std = x.mean(), x.std()
    if std == 0:
        raise ValueError("fit_skewnorm: references have zero spread")
    gamma = float(np.clip(stats.skew(x), -0.99, 0.99))
    r = (2.0 * abs(gamma) / (4.0 - math.pi)) ** (2.0 / 3.0)
    b2 = r / (1.0 + r)  # b² = δ²·2/π
    delta = math.copysign(math.sqrt(b2 * math.pi / 2.0), gamma)
    a0 = delta / math.sqrt(1.0 - delta * delta)
    scale0 = std / math.sqrt(1.0 - 2.0 * delta * delta / math.pi)
    loc0 = mean - scale0 * delta * math.sqrt(2.0 / math.pi)
    a, loc, scale = stats.skewnorm.fit(x, a0, loc=loc0, scale=scale0)
    return float(a), float(loc), float(scale)


def _skewnorm_logcdf_quad(z: float, a: float) -> float:
    """log CDF of the standard skew-normal by quadrature in log space (for the far tail).

    With g(t) = log(2 φ(t) Φ(a t)):  log F(z) = g(z) + log ∫_0^∞ exp(g(z−u) − g(z)) du;
    the integrand is 1 at u = 0 and decays at rate |g'(z)|, so nothing under- or overflows.
    """
    def g(t: float) -> float:
        return math.log(2.0) + stats.norm.logpdf(t) + special.log_ndtr(a * t)

    g_z = g(z)
    # g'(t) = −t + a φ(a t)/Φ(a t); the ratio is evaluated in log space.
    slope = -z + a * math.exp(stats.norm.logpdf(a * z) - special.log_ndtr(a * z))
    rate = max(abs(slope), 1.0)
    integral, _ = integrate.quad(lambda v: math.exp(g(z - v / rate) - g_z), 0.0, np.inf)
    return g_z + math.log(integral / rate)


def skewnorm_logcdf(x, a: float, loc: float, scale: float) -> np.ndarray:
    """``log F(x; a, loc, scale)`` of the skew-normal, finite far into the left tail.

    scipy's ``skewnorm.logcdf`` is ``log(cdf)``: it returns −inf once the CDF underflows
    (≈ 1e−308) and is off by up to ~1e−3 nats in the left tail for large a. Below a CDF of
    e^−20 the quadrature of :func:`_skewnorm_logcdf_quad` is used instead (agrees with a
    50-digit mpmath integral to ~1e−9 nats).
    """
    z = (_as_1d_float64(x) - loc) / scale
    with np.errstate(divide="ignore"):
        out = np.asarray(stats.skewnorm.logcdf(z, a), dtype=np.float64).reshape(-1)
    for i in np.flatnonzero(~np.isfinite(out) | (out < -20.0)):
        out[i] = _skewnorm_logcdf_quad(float(z[i]), a)
    return out


def exposure_from_skewnorm(canary_logppl, reference_logppl,
                           params: tuple[float, float, float] | None = None) -> Tensor:
    """Extrapolated exposure ``−log2 F(Px(canary))`` with F a skew-normal fitted to references.

    Carlini et al. 2019, "The Secret Sharer", §4.3 ("exposure by extrapolation"). Computed as
    ``−logcdf / ln 2`` (never ``log(cdf)``) so canaries far below every reference still get a
    finite, large value. The fit is :func:`fit_skewnorm` unless ``params = (a, loc, scale)``
    are given (e.g. to reuse one fit for many canaries of the same format).

    Returns:
        (C,) float64 tensor.
    """
    a, loc, scale = params if params is not None else fit_skewnorm(reference_logppl)
    return torch.from_numpy(-skewnorm_logcdf(canary_logppl, a, loc, scale) / _LN2)


@torch.no_grad()
def count_references_below(model: nn.Module, prefix_ids: Tensor, canary_logppl: float,
                           reference_ids: Tensor, levels: tuple[int, ...] = (2, 4),
                           batch_size: int = 1024, margin_bits: float = 1e-3) -> int:
    """``#{r : Px(r) < Px(canary)}`` exactly, by branch and bound over secret prefixes.

    Px is a sum of non-negative per-token terms, so a reference whose first h tokens already
    cost more than the canary's whole secret can never rank below it. At each level h the
    distinct h-token heads of the surviving references are scored (few: ≤ |alphabet|^h) and
    references whose head exceeds ``Px(canary) + margin_bits`` are dropped; the survivors are
    scored in full. A memorised canary (Px ≈ 0) prunes nearly everything at h = 2, which makes
    the rank against 10⁴ references ~50× cheaper than scoring them all; an unmemorised one
    costs the full scoring plus the (small) head passes. A level whose distinct heads number
    more than half its survivors is skipped (with the deeper ones): its pass would cost about
    as much as scoring the survivors in full. ``margin_bits`` absorbs float32 rounding between
    the head and full passes, so pruning never changes the count.

    Args:
        prefix_ids: (P,) prefix the secrets follow.
        canary_logppl: Px(canary) in bits (from :func:`secret_log_perplexity`).
        reference_ids: (R, S) reference secrets.

    Returns:
        The number of references strictly more likely than the canary; use
        :func:`exposure_from_count` for the exposure.
    """
    survivors = reference_ids
    for h in levels:
        if h >= survivors.shape[1] or survivors.shape[0] == 0:
            break
        heads, head_of_row = torch.unique(survivors[:, :h], dim=0, return_inverse=True)  # (u, h)
        if 2 * heads.shape[0] > survivors.shape[0]:
            break  # deeper levels have at least as many heads
        head_cost = secret_log_perplexity(model, prefix_ids, heads, batch_size)  # (u,) bits
        survivors = survivors[head_cost[head_of_row] <= canary_logppl + margin_bits]
    if survivors.shape[0] == 0:
        return 0
    full = secret_log_perplexity(model, prefix_ids, survivors, batch_size)
    return int((full < canary_logppl).sum())


def exposure_from_count(count_below: int, num_references: int) -> float:
    """``log2|R_ref| − log2(1 + count_below)``: :func:`exposure_from_rank` given the count."""
    if num_references < 1 or not 0 <= count_below <= num_references:
        raise ValueError(f"need 0 ≤ count_below ≤ num_references ≥ 1, got {count_below}, {num_references}")
    return math.log2(num_references) - math.log2(1 + count_below)


def bounded_skewnorm_exposure(canary_logppl, reference_logppl, max_bits: float,
                              min_references: int = MIN_SKEWNORM_REFERENCES) -> Tensor:
    """:func:`exposure_from_skewnorm` capped at ``max_bits`` and refused when it is unreliable.

    A secret drawn from R carries at most log2|R| bits, so no exposure can exceed it: pass
    ``max_bits = log2|R|``. The fit is refused (``ExposureEstimateError`` with the reason) with
    fewer than ``min_references`` references, when the fit or its tail quadrature does not
    converge, or when it yields a non-finite value.

    Returns:
        (C,) float64 tensor in [0, max_bits].
    """
    count = _as_1d_float64(reference_logppl).size
    if count < min_references:
        raise ExposureEstimateError(f"skew-normal exposure needs ≥ {min_references} references, got {count}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", integrate.IntegrationWarning)
        try:
            params = fit_skewnorm(reference_logppl)
            values = exposure_from_skewnorm(canary_logppl, reference_logppl, params)
        except (integrate.IntegrationWarning, ValueError, FloatingPointError) as error:
            raise ExposureEstimateError(f"skew-normal exposure refused: {error}") from error
    if not torch.isfinite(values).all() or not math.isfinite(params[2]) or params[2] <= 0:
        raise ExposureEstimateError(f"skew-normal exposure refused: fit {params} gave non-finite values")
    return values.clamp(0.0, max_bits)
