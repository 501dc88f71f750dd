"""K-FAC curvature of linear layers, its Kronecker eigenbasis and subspace projections.

    from ortho_train.kfac import KFACCollector, collect_kfac, eigenbases, SubspaceConfig, project_out
    factors = collect_kfac(model, public_batches, nll_sum_and_count_fn)   # {name: KFACFactors}
    bases = eigenbases(factors)                                           # {name: KroneckerEigenbasis}
    masks = SubspaceConfig("flattest", fraction=0.5).masks(bases)           # S_gen per layer
    g = project_out(join_bias(grad_w, grad_b), bases[name], masks[name])  # off S_gen

Pure torch; no Lightning. `python benchmarks/kfac_collect.py` times factor collection and
eigendecomposition against a plain forward+backward.
"""
from ortho_train.kfac.eigenbasis import KroneckerEigenbasis, eigenbases, join_bias, split_bias
from ortho_train.kfac.factors import KFACCollector, KFACFactors, collect_kfac
from ortho_train.kfac.subspace import (
    SUBSPACES,
    SubspaceConfig,
    component_in,
    project_out,
    project_update_,
)

__all__ = [
    "KFACCollector",
    "KFACFactors",
    "KroneckerEigenbasis",
    "SUBSPACES",
    "SubspaceConfig",
    "collect_kfac",
    "component_in",
    "eigenbases",
    "join_bias",
    "project_out",
    "project_update_",
    "split_bias",
]
