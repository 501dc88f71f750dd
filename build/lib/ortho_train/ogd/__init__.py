"""OGD-projected fine-tuning maths: the protected subspace S_gen per linear and ΔW_priv storage.

    from ortho_train.ogd import OGDConfig, build_subspaces, SubspaceDelta
    subspaces = build_subspaces(model, layers, OGDConfig(subspace="flattest").spec, batches, nll_fn)
    g_w, g_b = subspaces[name].project_out(grad_w, grad_b)       # off S_gen

Pure torch; the training loop around it is `ortho_train.private_update.ogd.OGDController`.
"""
from ortho_train.ogd.config import OGDConfig
from ortho_train.ogd.delta import SubspaceDelta, bits_per_weight
from ortho_train.ogd.subspaces import ProtectedSubspace, build_subspaces, check_subspace_fits, layer_directions

__all__ = ["OGDConfig", "ProtectedSubspace", "SubspaceDelta", "bits_per_weight", "build_subspaces",
           "check_subspace_fits", "layer_directions"]
