"""ΔW_pub / ΔW_priv: dense SFT's attributed AdamW steps add up; OGD's η is reported."""
import math

import pytest
import torch

from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.isolation import IsolationConfig
from tests.separation_fits import TINY, dense_fit, ogd_fit


def test_dense_displacements_sum_to_the_total_displacement():
    module, _ = dense_fit()
    found = module.displacements()
    assert found is not None and found.public.keys() == found.private.keys()
    final = module.model.state_dict()
    for key, public in found.public.items():
        total = final[key].double() - module.pre_canary_state_dict[key].double()
        # AdamW's step is linear in its first moment once D = √v̂ + ε is fixed, and the moment is
        # linear in the (clipped) gradient, so the public and canary parts' steps add up to the
        # applied step; only float32 round-off of the weights themselves separates the two.
        err = (found.public[key] + found.private[key] - total).norm() / total.norm()
        assert err < 1e-4, f"{key}: ΔW_pub + ΔW_priv misses W_ft − W_pre by {float(err):.1e} (relative)"
        assert found.private[key].norm() > 0 and public.norm() > 0, key
    eta = found.entanglement()
    assert 0.0 <= eta.overall <= 1.0 and set(eta.per_layer) == set(found.public)


def test_dense_without_tracking_reports_none():
    module = CanarySFTModule(tiny_llama=TINY)
    assert module.displacements() is None and module.private_update.tracker is None


def test_ogd_eta_is_reported_and_within_unit_interval():
    module, _ = ogd_fit()
    found = module.displacements()
    for name, (dw, _) in module.private_update.delta.items():
        assert torch.equal(found.private[f"{name}.weight"], dw.detach().double())
    eta = found.entanglement()
    assert not math.isnan(eta.overall) and 0.0 <= eta.overall <= 1.0
    assert all(0.0 <= v <= 1.0 for v in eta.per_layer.values())


def test_tracking_with_isolation_fails_naming_the_setting():
    with pytest.raises(ValueError, match="track_displacements"):
        CanarySFTModule(tiny_llama=TINY, isolation=IsolationConfig(), track_displacements=True)
