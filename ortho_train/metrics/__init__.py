"""Memorisation metrics (pure torch + scipy/torchmetrics; no Lightning).

Log-prob helpers shared with the unlearning losses, perplexity, extraction, exposure,
membership inference and MUSE-style VerbMem/KnowMem/PrivLeak. See docs/methods.md §2.
ROUGE-L (`rouge`), TOFU's truth ratio, forget quality and model utility (`tofu`) and answer
log-probabilities (`answer_scoring`) serve the benchmark evaluations (docs/benchmarks.md).
"""
from ortho_train.metrics.exposure import (
    count_references_below,
    exposure_from_count,
    exposure_from_rank,
    exposure_from_skewnorm,
    bounded_skewnorm_exposure,
    ExposureEstimateError,
    fit_skewnorm,
    secret_log_perplexity,
    skewnorm_logcdf,
)
from ortho_train.metrics.extraction import extraction_rate, greedy_continuation
from ortho_train.metrics.logprobs import (
    IGNORE_INDEX,
    LOGIT_BUDGET_BYTES,
    TokenDistributionStats,
    batch_within_logit_budget,
    sequence_logprob,
    sequence_nll_mean,
    token_distribution_stats,
    token_logprobs,
    vocab_size_of,
)
from ortho_train.metrics.mia import (mia_report, mia_scores, mia_scores_from_stats, roc_auc, roc_auc_standard_error, roc_curve,
                                     tpr_at_fpr, zlib_bits)
from ortho_train.metrics.muse import (
    greedy_rouge_l_f1,
    knowmem,
    muse_privleak_auc,
    privleak,
    verbmem,
)
from ortho_train.metrics.rouge import lcs_length, rouge_l, rouge_l_f1, rouge_l_recall, rouge_tokens
from ortho_train.metrics.perplexity import bits_per_token, nll_sum_and_count, perplexity
from ortho_train.metrics.scoring import (batch_within_budget, label_distribution_stats, label_logprobs,
                                         position_logprobs)

__all__ = [
    "IGNORE_INDEX",
    "TokenDistributionStats",
    "batch_within_budget",
    "bits_per_token",
    "count_references_below",
    "exposure_from_count",
    "exposure_from_rank",
    "exposure_from_skewnorm",
    "bounded_skewnorm_exposure",
    "ExposureEstimateError",
    "extraction_rate",
    "fit_skewnorm",
    "greedy_continuation",
    "greedy_rouge_l_f1",
    "knowmem",
    "label_distribution_stats",
    "label_logprobs",
    "lcs_length",
    "mia_report",
    "mia_scores",
    "mia_scores_from_stats",
    "muse_privleak_auc",
    "nll_sum_and_count",
    "perplexity",
    "position_logprobs",
    "privleak",
    "roc_auc",
    "roc_auc_standard_error",
    "roc_curve",
    "rouge_l",
    "rouge_l_f1",
    "rouge_l_recall",
    "rouge_tokens",
    "secret_log_perplexity",
    "sequence_logprob",
    "sequence_nll_mean",
    "skewnorm_logcdf",
    "token_distribution_stats",
    "token_logprobs",
    "vocab_size_of",
    "batch_within_logit_budget",
    "LOGIT_BUDGET_BYTES",
    "tpr_at_fpr",
    "verbmem",
    "zlib_bits",
]
