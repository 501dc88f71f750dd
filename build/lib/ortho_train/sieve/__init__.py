"""The Hessian sieve (docs/methods.md §5): split each linear into a low-bit base and a sparse ortho stream.

    from ortho_train.sieve import SieveConfig, sieve_model, build_dual_stream_model
    layers = sieve_model(model, "posthoc", SieveConfig(rho=0.01), hessians)
    dual = build_dual_stream_model(model, layers)       # OrthoLinear layers, HF generate works
    save_sieved(dual, "out/")                           # base.safetensors + ortho.safetensors

Variants: "posthoc" (LibOrtho), "delta" (base from the pre-fine-tuning weights), "isolated"
(ortho on a support fixed before fine-tuning; see `ortho_train.sieve.support` and the
isolated mode of `CanarySFTModule`).
"""
from ortho_train.sieve.artifacts import SieveArtifactError, load_sieved, save_sieved
from ortho_train.sieve.core import (
    VARIANTS,
    SievedLayer,
    SieveConfig,
    sieve_delta,
    sieve_isolated,
    sieve_posthoc,
)
from ortho_train.sieve.model import (
    build_dual_stream_model,
    quantised_layers,
    sieve_model,
    stream_stats,
)
from ortho_train.sieve.select import (
    adaptive_threshold,
    dqc_compensate,
    hinv_diagonal,
    hop_column_errors,
    hop_report,
    impact_scores,
    top_fraction_mask,
)
from ortho_train.sieve.support import (
    SUPPORTS,
    gradient_saliency,
    impact_support,
    random_support,
    saliency_support,
)

__all__ = [
    "SUPPORTS", "SieveArtifactError", "SieveConfig", "SievedLayer", "VARIANTS",
    "adaptive_threshold", "build_dual_stream_model", "dqc_compensate", "gradient_saliency",
    "hinv_diagonal", "hop_column_errors", "hop_report", "impact_scores", "impact_support",
    "load_sieved", "quantised_layers", "random_support", "saliency_support", "save_sieved",
    "sieve_delta", "sieve_isolated", "sieve_model", "sieve_posthoc", "stream_stats",
    "top_fraction_mask",
]
