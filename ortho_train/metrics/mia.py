"""Membership-inference scores and their ROC summaries.

Every score follows one sign convention: **higher = more likely a training member**. Only
label-scored tokens count (prompt and padding carry ``ignore_index``). A sequence with no
scored token gets NaN scores, and the ROC functions refuse NaN rather than rank it.

Scores (all from next-token log-probs ``log p_t`` over the n scored tokens of a sequence):

* ``loss`` — Yeom et al. 2018: ``(1/n) Σ_t log p_t`` (= −mean NLL, nats).
* ``zlib`` — Carlini et al. 2021, "Extracting Training Data from Large Language Models":
  the ratio of log-perplexity to zlib entropy, ``r = mean NLL / (8 · len(zlib.compress(text)))``
  (nats per bit of zlib-compressed text; level 6, UTF-8). Memorised text has low perplexity
  for its compressibility, so the score is ``−r``.
* ``mink_<K>`` — Shi et al. 2024, "Detecting Pretraining Data from Large Language Models"
  (Min-K% Prob): mean of the lowest ⌊k·n⌋ (at least 1) token log-probs.
* ``minkpp_<K>`` — Zhang et al. 2024, "Min-K%++": the same over
  ``z_t = (log p_t − μ_t)/σ_t`` with μ_t, σ_t the mean and std of log p under the model's own
  next-token distribution (:func:`~ortho_train.metrics.logprobs.token_distribution_stats`).

ROC: torchmetrics' ``binary_auroc``/``binary_roc`` pass predictions outside [0, 1] through a
sigmoid, which saturates and ties large-magnitude scores (e.g. sums of log-probs). Scores are
therefore replaced by their dense ranks, scaled into [0, 1] in float64, before torchmetrics
sees them: an order-preserving map that keeps ties as ties, so the curve is unchanged.
"""
from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_roc

from ortho_train.metrics.logprobs import IGNORE_INDEX, TokenDistributionStats, token_distribution_stats


def _lowest_k_mean(values: Tensor, mask: Tensor, k: float) -> Tensor:
    """Mean of the lowest max(1, ⌊k·n_b⌋) masked entries per row; NaN for rows with n_b = 0."""
    n = mask.sum(dim=-1)  # (B,)
    if values.shape[-1] == 0:
        return torch.full(n.shape, math.nan, dtype=torch.float64, device=values.device)
    sorted_vals = values.masked_fill(~mask, math.inf).sort(dim=-1).values  # (B, T-1), masked last
    # 1e-9 keeps ⌊0.2·10⌋ = 2 despite binary rounding of k.
    kk = torch.floor(k * n.double() + 1e-9).long().clamp(min=1)  # (B,)
    csum = sorted_vals.double().cumsum(dim=-1)
    idx = (kk - 1).clamp(max=values.shape[-1] - 1).unsqueeze(-1)
    out = csum.gather(-1, idx).squeeze(-1) / kk
    return out.masked_fill(n == 0, math.nan)


def zlib_bits(text: str | bytes) -> int:
    """zlib entropy of a text: ``8 · len(zlib.compress(utf8(text)))`` bits (default level)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return 8 * len(zlib.compress(data))


@torch.no_grad()
def mia_scores(logits: Tensor, labels: Tensor, texts: Sequence[str | bytes] | None = None,
               ks: Sequence[float] = (0.2, 0.4), ignore_index: int = IGNORE_INDEX,
               attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sequence membership scores (higher = more likely member); see the module docstring.

    Args:
        logits: (B, T, V) model outputs for ``input_ids``.
        labels: (B, T) aligned with ``input_ids``; ``ignore_index`` marks unscored tokens.
        texts: the B texts whose tokens are scored (for ``zlib``); without them the ``zlib``
            key is omitted.
        ks: fractions for Min-K% and Min-K%++; key suffix is ``round(100·k)``.

    Returns:
        ``{"loss", "zlib"?, "mink_<K>"…, "minkpp_<K>"…}`` → (B,) float64 CPU tensors.
    """
    stats = token_distribution_stats(logits, labels, ignore_index, attention_mask)
    return mia_scores_from_stats(stats, texts, ks)


@torch.no_grad()
def mia_scores_from_stats(stats: TokenDistributionStats, texts: Sequence[str | bytes] | None = None,
                          ks: Sequence[float] = (0.2, 0.4)) -> dict[str, Tensor]:
    """:func:`mia_scores` from the per-token statistics of the scored positions (B, T-1)
    (`metrics.token_distribution_stats`, or `metrics.scoring.label_distribution_stats`, which
    never holds a large vocabulary's logits whole)."""
    mask = stats.mask
    n = mask.sum(dim=-1)  # (B,)
    loss = (stats.logp.double().sum(dim=-1) / n).masked_fill(n == 0, math.nan)  # −mean NLL
    scores = {"loss": loss}
    if texts is not None:
        if len(texts) != mask.shape[0]:
            raise ValueError(f"{len(texts)} texts for a batch of {mask.shape[0]}")
        bits = torch.tensor([zlib_bits(t) for t in texts], dtype=torch.float64,
                            device=loss.device)
        scores["zlib"] = loss / bits  # = −(mean NLL / zlib bits)
    z = (stats.logp - stats.mu) / stats.sigma  # (B, T-1), Min-K%++ token score
    for k in ks:
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {k}")
        name = round(100 * k)
        scores[f"mink_{name}"] = _lowest_k_mean(stats.logp, mask, k)
        scores[f"minkpp_{name}"] = _lowest_k_mean(z, mask, k)
    return {key: value.double().cpu() for key, value in scores.items()}


def _ranked_inputs(member_scores, nonmember_scores) -> tuple[Tensor, Tensor]:
    """Dense ranks of all scores scaled into [0, 1] (float64), and the 1/0 member targets."""
    member = torch.as_tensor(member_scores, dtype=torch.float64).reshape(-1).cpu()
    nonmember = torch.as_tensor(nonmember_scores, dtype=torch.float64).reshape(-1).cpu()
    if member.numel() == 0 or nonmember.numel() == 0:
        raise ValueError("ROC needs at least one member and one non-member score")
    scores = torch.cat([member, nonmember])
    if not torch.isfinite(scores).all():
        raise ValueError("ROC scores contain NaN/inf (a sequence with no scored tokens?)")
    unique, dense_rank = torch.unique(scores, return_inverse=True)
    scaled = dense_rank.double() / max(unique.numel() - 1, 1)  # in [0, 1]: no sigmoid
    target = torch.cat([torch.ones_like(member), torch.zeros_like(nonmember)]).long()
    return scaled, target


def roc_auc(member_scores, nonmember_scores) -> float:
    """ROC-AUC of "member" vs "non-member" (higher score = member).

    Equals the Mann–Whitney probability ``P(s_member > s_nonmember) + ½ P(tie)``: identical
    score distributions give 0.5, perfect separation 1. Computed with torchmetrics
    ``binary_auroc`` on rank-scaled scores (see the module docstring).
    """
    scaled, target = _ranked_inputs(member_scores, nonmember_scores)
    return float(binary_auroc(scaled, target))


def roc_auc_standard_error(member_scores, nonmember_scores) -> float:
    """Standard error of the empirical ROC-AUC, by DeLong, DeLong & Clarke-Pearson 1988
    ("Comparing the areas under two or more correlated receiver operating characteristic
    curves"): with ψ(x, y) = 1[x > y] + ½·1[x = y] over members x_i (m of them) and
    non-members y_j (n), the placements V_i = mean_j ψ(x_i, y_j) and W_j = mean_i ψ(x_i, y_j)
    give Var(AUC) = s²(V)/m + s²(W)/n (sample variances; a set of one contributes 0).
    An uninformative score with m = 20, n = 200 has SE ≈ 0.07 around 0.5."""
    member = torch.as_tensor(member_scores, dtype=torch.float64).reshape(-1, 1).cpu()
    nonmember = torch.as_tensor(nonmember_scores, dtype=torch.float64).reshape(1, -1).cpu()
    if member.numel() == 0 or nonmember.numel() == 0:
        raise ValueError("ROC needs at least one member and one non-member score")
    psi = (member > nonmember).double() + 0.5 * (member == nonmember).double()  # (m, n)
    var_v = psi.mean(dim=1).var().item() if member.numel() > 1 else 0.0
    var_w = psi.mean(dim=0).var().item() if nonmember.numel() > 1 else 0.0
    return math.sqrt(var_v / member.numel() + var_w / nonmember.numel())


def roc_curve(member_scores, nonmember_scores) -> tuple[list[float], list[float]]:
    """ROC points ``(fpr, tpr)`` of "member" vs "non-member", from (0, 0) to (1, 1).

    The same curve :func:`roc_auc` integrates (torchmetrics ``binary_roc`` on rank-scaled
    scores): only rates, no thresholds, so nothing of the scored sequences is kept.
    """
    scaled, target = _ranked_inputs(member_scores, nonmember_scores)
    fpr, tpr, _ = binary_roc(scaled, target)
    return [float(v) for v in fpr], [float(v) for v in tpr]


def _tpr_at_fpr(scaled: Tensor, target: Tensor, fpr: float) -> float:
    fpr_curve, tpr_curve, _ = binary_roc(scaled, target)
    return float(tpr_curve[fpr_curve <= fpr + 1e-12].max())


def _warn_few_nonmembers(n_nonmember: int, fpr: float) -> None:
    need = math.ceil(1.0 / fpr - 1e-9)
    if n_nonmember < need:
        warnings.warn(f"TPR at FPR={fpr:g} from {n_nonmember} non-members is unresolved: "
                      f"need at least 1/FPR = {need}", stacklevel=3)


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float = 0.01) -> float:
    """Largest true-positive rate over ROC thresholds whose false-positive rate is ≤ ``fpr``.

    Carlini et al. 2022 ("Membership Inference Attacks From First Principles") argue for this
    low-FPR summary over AUC. Warns when fewer than 1/fpr non-members are given, since the
    empirical FPR then cannot resolve ``fpr`` (the value is the TPR at FPR = 0).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    scaled, target = _ranked_inputs(member_scores, nonmember_scores)
    _warn_few_nonmembers(int((target == 0).sum()), fpr)
    return _tpr_at_fpr(scaled, target, fpr)


def mia_report(member_scores: Mapping[str, Tensor], nonmember_scores: Mapping[str, Tensor],
               fpr: float = 0.01) -> dict[str, float]:
    """Flat report ``{"auc_<name>": …, "tpr@1%fpr_<name>": …}`` for every score name.

    ``member_scores`` and ``nonmember_scores`` map score names (as from :func:`mia_scores`) to
    (N,) tensors; only names present in both are reported. The FPR label is
    ``f"{100·fpr:g}%"`` (``1%`` for the default).
    """
    names = [name for name in member_scores if name in nonmember_scores]
    if not names:
        raise ValueError("mia_report: no score name is shared by members and non-members")
    label = f"tpr@{100 * fpr:g}%fpr"
    report: dict[str, float] = {}
    warned = False
    for name in names:
        scaled, target = _ranked_inputs(member_scores[name], nonmember_scores[name])
        if not warned:
            _warn_few_nonmembers(int((target == 0).sum()), fpr)
            warned = True
        report[f"auc_{name}"] = float(binary_auroc(scaled, target))
        report[f"{label}_{name}"] = _tpr_at_fpr(scaled, target, fpr)
    return report
