"""One evaluation of memorisation, shared by training, the sieve and the PTQ-gap callbacks.

`evaluate_memorisation(model, probe)` measures (docs/methods.md §2):
- extraction: greedy decoding from each canary prefix, exact match of the whole secret
  (`extraction_rate`) and per-token accuracy (`symbol_accuracy`; one token = one symbol with
  the byte tokenizer), for members and for holdout canaries (never trained: ≈ 0 expected);
- exposure (Carlini et al. 2019): rank of each member's secret among reference secrets in the
  same prefix context, `log2|R_ref| − log2 rank`, and the skew-normal extrapolation;
- membership inference, members vs holdout: LOSS, zlib, Min-K% (k=20%, 40%), Min-K%++ over the
  secret's tokens (the only random part of a canary: a score over the id tokens too correlates
  with the id on a model that never saw a canary); ROC-AUC with its DeLong standard error
  (`mia_auc_<score>_se`) and TPR at 1% FPR;
- public perplexity on held-out public windows.

Secrets live only in the probe's tensors; nothing here logs or returns text.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ortho_train import metrics
from ortho_train.token_datasets import MemorisationProbe, TokenisedCanaries, pad_collate
from ortho_train.models import eval_mode


SCORED_TOKENS = {
    "mia": "the secret's tokens only, conditioned on the canary prefix (members and holdouts are drawn "
           "alike, so only training can separate them; the id and template tokens are left out: their "
           "log-probabilities vary with the id on any model)",
    "exposure": "the secret's tokens only, conditioned on the canary prefix",
    "extraction": "greedy decoding of the secret's tokens from the canary prefix",
}


def _groups_by_length(*columns: list[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Indices grouped by the lengths of their entries in each column (batching without pads)."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, entries in enumerate(zip(*columns)):
        groups[tuple(len(e) for e in entries)].append(index)
    return groups


@torch.no_grad()
def extraction_metrics(model, canaries: TokenisedCanaries, batch_size: int = 256) -> dict[str, float]:
    """Greedy-decode len(secret) tokens from each prefix; exact-match rate and token accuracy."""
    exact, symbols, total_symbols = 0.0, 0.0, 0
    for (_, secret_len), rows in _groups_by_length(canaries.prefix_ids, canaries.secret_ids).items():
        prefixes = torch.stack([canaries.prefix_ids[i] for i in rows])  # (G, P)
        secrets = torch.stack([canaries.secret_ids[i] for i in rows])  # (G, S)
        generated = metrics.greedy_continuation(model, prefixes, secret_len, batch_size=batch_size)
        result = metrics.extraction_rate(generated.cpu(), secrets)
        exact += result["exact_match_rate"] * len(rows)
        symbols += result["symbol_accuracy"] * len(rows) * secret_len
        total_symbols += len(rows) * secret_len
    return {"extraction_rate": exact / len(canaries), "symbol_accuracy": symbols / total_symbols}


@torch.no_grad()
def exposure_metrics(
    model,
    canaries: TokenisedCanaries,
    reference_secret_ids: list[torch.Tensor],
    max_canaries: int | None = None,
    skewnorm_references: int = 1000,
    batch_size: int = 1024,
    progress: bool = False,
    randomness_space_size: int | None = None,
    fit_scores: list | None = None,
) -> dict[str, float | str | None]:
    """Exposure of member secrets: exact rank against all references, and skew-normal.

    Each canary's secret is ranked against the references placed in the same prefix context
    (branch-and-bound count, exact); the rank estimate shows at most log2(#references) bits.
    The skew-normal extrapolation is fitted to the first `skewnorm_references` references,
    scored in full, and capped at log2|R| (`randomness_space_size`); when it is refused (too
    few references, a fit that does not converge) `exposure_skewnorm_mean` is None and
    `exposure_skewnorm_refused` says why. `skewnorm_references=0` skips it (tables that do not
    show it: scoring the fit's references in full is most of the cost of exposure). Both cover
    the secret's tokens only, conditioned on the canary's prefix. `fit_scores`, a list, gets
    `(Px(canary), Px(fit references))` in bits per canary whose fit was scored (for
    `exposure_histogram`, which pools the same numbers).
    """
    count = len(canaries) if max_canaries is None else min(max_canaries, len(canaries))
    ref_groups = _groups_by_length(reference_secret_ids)
    fit_groups = _groups_by_length(reference_secret_ids[:skewnorm_references])
    max_bits = math.log2(randomness_space_size) if randomness_space_size else math.inf
    ranked, extrapolated = [], []
    refused = "not computed (skewnorm_references=0)" if skewnorm_references == 0 else None
    for i in tqdm(range(count), desc="exposure", unit="canary", disable=not progress, leave=False):
        prefix = canaries.prefix_ids[i]
        canary_lp = metrics.secret_log_perplexity(model, prefix, canaries.secret_ids[i][None], batch_size)
        below = sum(
            metrics.count_references_below(
                model, prefix, canary_lp.item(), torch.stack([reference_secret_ids[j] for j in rows]),
                batch_size=batch_size,
            )
            for rows in ref_groups.values()
        )
        ranked.append(metrics.exposure_from_count(below, len(reference_secret_ids)))
        if refused is None:
            fit_lp = _fit_log_perplexities(model, prefix, reference_secret_ids, fit_groups, batch_size)
            if fit_scores is not None:
                fit_scores.append((canary_lp.item(), fit_lp))
            try:
                extrapolated.append(metrics.bounded_skewnorm_exposure(canary_lp, fit_lp, max_bits).item())
            except metrics.ExposureEstimateError as error:
                refused = str(error)
    ranked_t = torch.tensor(ranked, dtype=torch.float64)
    out = {
        "exposure_mean": ranked_t.mean().item(),
        "exposure_min": ranked_t.min().item(),
        "exposure_max_measurable": math.log2(len(reference_secret_ids)),
        "exposure_skewnorm_mean": None if refused else sum(extrapolated) / len(extrapolated),
    }
    if refused:
        out["exposure_skewnorm_refused"] = refused
    return out


def _fit_log_perplexities(model, prefix, reference_secret_ids, fit_groups, batch_size) -> torch.Tensor:
    """Px (bits) of the fit's references in one canary's prefix context, group by group."""
    return torch.cat([
        metrics.secret_log_perplexity(model, prefix, torch.stack([reference_secret_ids[j] for j in rows]), batch_size)
        for rows in fit_groups.values()
    ])


def _secret_is_argmax(predicted: torch.Tensor, canaries: TokenisedCanaries, rows: range) -> torch.Tensor:
    """Per canary: is every secret token the argmax after the true tokens before it? (bool (b,))

    `predicted` (b, T-1): the argmax token at each position (position t predicts token t + 1).
    Greedy decoding returns the secret exactly when this holds (by induction over the secret's
    tokens: each greedy step sees the true tokens so far), so one teacher-forced pass gives the
    exact-match extraction of greedy decoding without decoding.
    """
    predicted = predicted.cpu()
    hits = []
    for row, index in enumerate(rows):
        start, length = len(canaries.prefix_ids[index]), len(canaries.secret_ids[index])
        guess = predicted[row, start - 1:start - 1 + length]  # (S,)
        hits.append(bool(torch.equal(guess, canaries.secret_ids[index].cpu())))
    return torch.tensor(hits)


ScoredSpan = Literal["secret", "sequence"]


def span_labels(labels: torch.Tensor, canaries: TokenisedCanaries, rows: range) -> torch.Tensor:
    """`labels` (b, T) with every position outside each canary's secret set to −100."""
    kept = torch.full_like(labels, -100)  # (b, T)
    for row, index in enumerate(rows):
        start = len(canaries.prefix_ids[index])
        end = start + len(canaries.secret_ids[index])
        kept[row, start:end] = labels[row, start:end]
    return kept


@torch.no_grad()
def sequence_mia_scores(
    model, canaries: TokenisedCanaries, pad_token_id: int, batch_size: int = 64, span: ScoredSpan = "secret"
) -> dict[str, torch.Tensor]:
    """Per-canary MIA scores (higher = more likely member) and `secret_is_argmax` (bool: the
    greedy exact-match check of `_secret_is_argmax`, from the same forward pass).

    `span="secret"` scores the secret's tokens (conditioned on the prefix) and takes the zlib
    entropy of the secret's text; `"sequence"` scores every token after the first of the whole
    canary, id and template included (kept to show the id confound it carries)."""
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    longest = max((len(ids) for ids in canaries.full_ids), default=1)
    # unchunked: logits, log-softmax and the Min-K%++ moments, ~5 float32 (T, V) tensors per canary
    batch_size = metrics.batch_within_budget(model, batch_size, longest, copies=5)
    for start in range(0, len(canaries), batch_size):
        chunk = slice(start, start + batch_size)
        rows = range(len(canaries))[chunk]
        batch = pad_collate(canaries.full_ids[chunk], pad_token_id)
        labels = span_labels(batch["labels"], canaries, rows) if span == "secret" else batch["labels"]
        texts = canaries.secret_texts[chunk] if span == "secret" else canaries.texts[chunk]
        stats, predicted = metrics.label_distribution_stats(  # (b, T-1) each; no (b, T, V) at a large V
            model, batch["input_ids"].to(device), labels.to(device), batch["attention_mask"].to(device))
        scores = metrics.mia_scores_from_stats(stats, texts=texts)
        scores["secret_is_argmax"] = _secret_is_argmax(predicted, canaries, rows)
        for name, value in scores.items():
            parts[name].append(value.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


@torch.no_grad()
def canary_scores(model, probe: MemorisationProbe) -> dict[str, dict[str, torch.Tensor]]:
    """`sequence_mia_scores` of the members and of the holdout canaries (one pass each)."""
    with eval_mode(model):
        return {"members": sequence_mia_scores(model, probe.members, probe.pad_token_id),
                "holdout": sequence_mia_scores(model, probe.holdout, probe.pad_token_id)}


MIA_SUMMARY_NAMES = {"loss": "loss", "zlib": "zlib", "mink_20": "mink", "mink_40": "mink_40",
                     "minkpp_20": "minkpp", "minkpp_40": "minkpp_40"}


def mia_metrics(model, probe: MemorisationProbe, scores: dict | None = None) -> dict[str, float]:
    """ROC-AUC and TPR@1%FPR of each MIA score, members vs holdout canaries (from `scores`,
    the `canary_scores` of the model, when given)."""
    if len(probe.holdout) == 0:
        return {}
    scores = scores or canary_scores(model, probe)
    members, holdout = scores["members"], scores["holdout"]
    out = {}
    for score_name, short in MIA_SUMMARY_NAMES.items():
        out[f"mia_auc_{short}"] = metrics.roc_auc(members[score_name], holdout[score_name])
        out[f"mia_auc_{short}_se"] = metrics.roc_auc_standard_error(members[score_name], holdout[score_name])
        out[f"mia_tpr_at_1pct_fpr_{short}"] = metrics.tpr_at_fpr(members[score_name], holdout[score_name], 0.01)
    return out


def mia_roc_curves(model, probe: MemorisationProbe, fpr: float = 0.01, scores: dict | None = None) -> dict[str, dict]:
    """ROC curve of each MIA score, members vs holdout: `{score: {fpr, tpr, auc, tpr_at_fpr}}`.

    Rates only (no scores, thresholds or texts), for plotting; `tpr_at_fpr` is at `fpr`.
    Empty without holdout canaries. `scores`: the model's `canary_scores`, if already computed.
    """
    if len(probe.holdout) == 0:
        return {}
    scores = scores or canary_scores(model, probe)
    members, holdout = scores["members"], scores["holdout"]
    curves = {}
    for score_name, short in MIA_SUMMARY_NAMES.items():
        fprs, tprs = metrics.roc_curve(members[score_name], holdout[score_name])
        curves[short] = {"fpr": fprs, "tpr": tprs, "auc": metrics.roc_auc(members[score_name], holdout[score_name]),
                         "tpr_at_fpr": max(t for f, t in zip(fprs, tprs) if f <= fpr + 1e-12)}
    return {"fpr_level": fpr, "members": len(probe.members), "holdout": len(probe.holdout), "curves": curves}


@torch.no_grad()
def exposure_reference_histogram(model, probe: MemorisationProbe, contexts: int = 5,
                                 references: int = 1000, bins: int = 40) -> dict:
    """Histogram of reference-secret log-perplexities (bits) with its skew-normal fit.

    The first `references` reference secrets are scored in the prefix context of each of the
    first `contexts` members and pooled; the fit is `metrics.fit_skewnorm` of the pooled
    values. Only bin edges, counts, the fit's (a, loc, scale) and the members' own
    log-perplexities (each in its context) are returned: nothing from which a secret could be
    rebuilt. These are the pictures of exposure in "The Secret Sharer" (Carlini et al. 2019).
    """
    with eval_mode(model):
        count = min(contexts, len(probe.members))
        groups = _groups_by_length(probe.reference_secret_ids[:references])
        scored = []
        for i in range(count):
            prefix = probe.members.prefix_ids[i]
            member_lp = metrics.secret_log_perplexity(model, prefix, probe.members.secret_ids[i][None]).item()
            scored.append((member_lp, _fit_log_perplexities(model, prefix, probe.reference_secret_ids, groups, 1024)))
    return exposure_histogram(scored, bins)


def exposure_histogram(scored: list[tuple[float, torch.Tensor]], bins: int = 40) -> dict:
    """The histogram of `exposure_reference_histogram` from already scored contexts: one
    `(Px(member), Px(references))` pair per context, e.g. the `fit_scores` of `exposure_metrics`."""
    values = torch.cat([references for _, references in scored]).double().numpy()
    counts, edges = np.histogram(values, bins=bins)
    a, loc, scale = metrics.fit_skewnorm(values)
    return {"units": "bits", "contexts": len(scored), "references": len(values) // max(len(scored), 1),
            "bin_edges": edges.tolist(), "counts": counts.tolist(),
            "skewnorm": {"a": a, "loc": loc, "scale": scale}, "member_log_perplexity": [lp for lp, _ in scored]}


METRIC_GROUP_KEYS = {  # what each `include` group of evaluate_memorisation yields (the keys tables show)
    "extraction": ("extraction_rate", "symbol_accuracy", "holdout_extraction_rate"),
    "mia": ("mia_auc_loss", "mia_auc_minkpp", "mia_tpr_at_1pct_fpr_loss", "mia_tpr_at_1pct_fpr_minkpp"),
    "ppl": ("public_ppl",),
}


def groups_known(known: dict, include: Sequence[str]) -> tuple[str, ...]:
    """The groups of `include` whose keys `known` holds in full (exposure never: its numbers
    depend on how many references and canaries were used)."""
    return tuple(g for g in include if g in METRIC_GROUP_KEYS and all(k in known for k in METRIC_GROUP_KEYS[g]))


def evaluate_memorisation(
    model,
    probe: MemorisationProbe,
    exposure_canaries: int | None = None,
    exposure_references: int | None = None,
    include: Sequence[str] = ("extraction", "exposure", "mia", "ppl"),
    progress: bool = False,
    skewnorm_references: int = 1000,
    decode_holdout: bool = True,
    scores: dict | None = None,
    fit_scores: list | None = None,
) -> dict[str, float]:
    """All memorisation metrics of `model` on `probe` as a flat dict of floats.

    Args:
        exposure_canaries: compute exposure for the first n members only (None: all).
        exposure_references: use the first n reference secrets (None: all).
        include: subset of {"extraction", "exposure", "mia", "ppl"}.
        progress: show a progress bar over the exposure computation (the slow part).
        skewnorm_references: references the skew-normal exposure is fitted to (0: not computed).
        decode_holdout: greedy-decode the holdout canaries (`holdout_symbol_accuracy`); False
            takes `holdout_extraction_rate` from the MIA pass's teacher-forced check, the same
            exact-match rate without decoding (`_secret_is_argmax`), and reports no symbol accuracy.
        scores: the model's `canary_scores`, if the caller computed them (else computed here
            when MIA or the holdout check needs them).
        fit_scores: a list that gets the skew-normal fit's scores per member (`exposure_metrics`).
    """
    with eval_mode(model):
        out: dict[str, float] = {}
        if scores is None and len(probe.holdout) and ("mia" in include or ("extraction" in include and not decode_holdout)):
            scores = canary_scores(model, probe)
        if "extraction" in include:
            out.update(extraction_metrics(model, probe.members))
            if len(probe.holdout) and decode_holdout:
                holdout = extraction_metrics(model, probe.holdout)
                out["holdout_extraction_rate"] = holdout["extraction_rate"]
                out["holdout_symbol_accuracy"] = holdout["symbol_accuracy"]
            elif len(probe.holdout):
                out["holdout_extraction_rate"] = scores["holdout"]["secret_is_argmax"].double().mean().item()
        if "exposure" in include:
            references = probe.reference_secret_ids[:exposure_references]
            out.update(exposure_metrics(model, probe.members, references, exposure_canaries, progress=progress,
                                        randomness_space_size=probe.randomness_space_size,
                                        skewnorm_references=skewnorm_references, fit_scores=fit_scores))
        if "mia" in include:
            out.update(mia_metrics(model, probe, scores))
        if "ppl" in include:
            out["public_ppl"] = metrics.perplexity(model, probe.public_val_batches())
        return out


UNLEARNING_METRICS = ("extraction", "exposure", "mia", "verbmem", "ppl")


def evaluate_unlearning(
    model,
    forget_probe: MemorisationProbe,
    retain_members: TokenisedCanaries | None = None,
    exposure_references: int | None = None,
    skewnorm_references: int = 200,
    include: Sequence[str] = UNLEARNING_METRICS,
    scores: dict | None = None,
) -> dict[str, float]:
    """Forget and retain metrics of an unlearned model (docs/methods.md §2, MUSE), flat floats.

    `forget_probe` has the forget canaries as its members. Keys: `forget_extraction`,
    `forget_symbol_accuracy`, `holdout_extraction`, `retain_extraction` (the members not
    forgotten, if any); `forget_exposure` (rank against the first `exposure_references`
    references: at most log2 of their number) and `forget_exposure_skewnorm` (fitted to the
    first `skewnorm_references`); `forget_mia_auc_{loss,zlib,mink,mink_40,minkpp,minkpp_40}`
    (forget vs holdout); `forget_verbmem` (ROUGE-L F1 of the greedy continuation of each prefix
    against its secret + suffix); `public_ppl`. After unlearning the secrets are no longer
    likely, so exposure scores nearly every reference in full: its cost grows with the number
    of references, which is why both counts are parameters here. `scores`: the model's
    `canary_scores` over `forget_probe`, if already computed (the MIA reuses them).
    """
    members = forget_probe.members
    out: dict[str, float] = {}
    with eval_mode(model):
        if "extraction" in include:
            found = extraction_metrics(model, members)
            out["forget_extraction"], out["forget_symbol_accuracy"] = found["extraction_rate"], found["symbol_accuracy"]
            if len(forget_probe.holdout):
                out["holdout_extraction"] = extraction_metrics(model, forget_probe.holdout)["extraction_rate"]
            if retain_members is not None and len(retain_members):
                out["retain_extraction"] = extraction_metrics(model, retain_members)["extraction_rate"]
        if "exposure" in include:
            references = forget_probe.reference_secret_ids[:exposure_references]
            found = exposure_metrics(model, members, references, skewnorm_references=skewnorm_references,
                                     randomness_space_size=forget_probe.randomness_space_size)
            out["forget_exposure"] = found["exposure_mean"]
            if found["exposure_skewnorm_mean"] is not None:  # else refused: the key is absent, not a guess
                out["forget_exposure_skewnorm"] = found["exposure_skewnorm_mean"]
        if "mia" in include:
            out.update({f"forget_{k}": v for k, v in mia_metrics(model, forget_probe, scores).items() if k.startswith("mia_auc_")})
        if "verbmem" in include:
            continuations = [full[len(prefix):] for prefix, full in zip(members.prefix_ids, members.full_ids)]
            out["forget_verbmem"] = metrics.verbmem(model, members.prefix_ids, continuations)
        if "ppl" in include:
            out["public_ppl"] = metrics.perplexity(model, forget_probe.public_val_batches())
    return out
