"""Separating what a fine-tune learnt into parts, and measuring how separate they are.

    from ortho_train.separation import svd_split_state_dict, linear_weight_keys, entanglement
    split = svd_split_state_dict(base_sd, ft_sd, energy=0.9, keys=linear_weight_keys(model))
    clean_sd, ranks = split.state_dict, {k: s.rank for k, s in split.layers.items()}
    eta = entanglement(delta_public, delta_private).overall
    eta = module.displacements().entanglement()     # a run's tracked ΔW_pub, ΔW_priv

The separation table (`ortho_train.measurement.separation`) is imported from its own module: it
reads the private-update streams, which import this package.

Pure torch; no Lightning.
"""
from ortho_train.separation.displacement import AdamWDisplacementTracker, Displacements
from ortho_train.separation.geometry import (
    Entanglement,
    LossBarrier,
    curvature_quadratic,
    curvature_spectrum,
    entanglement,
    lmc_barrier,
    subspace_energy,
)
from ortho_train.separation.svd_split import (
    LayerSplit,
    SVDSplitResult,
    energy_rank,
    linear_weight_keys,
    magnitude_prune,
    pruned_state_dict,
    svd_split,
    svd_split_state_dict,
)

__all__ = [
    "AdamWDisplacementTracker",
    "Displacements",
    "Entanglement",
    "LayerSplit",
    "LossBarrier",
    "SVDSplitResult",
    "curvature_quadratic",
    "curvature_spectrum",
    "energy_rank",
    "entanglement",
    "linear_weight_keys",
    "lmc_barrier",
    "magnitude_prune",
    "pruned_state_dict",
    "subspace_energy",
    "svd_split",
    "svd_split_state_dict",
]
