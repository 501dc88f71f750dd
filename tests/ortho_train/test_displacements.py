"""ΔW_pub / ΔW_priv: dense SFT's attributed AdamW steps add up; OGD's η is reported."""
import math

import lightning as L
import pytest
import torch

from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig
from ortho_train.ogd import OGDConfig
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.isolation import IsolationConfig

TINY = TinyLlamaConfig(32, 2, 2, 64)


def _fit(tmp, **module_kwargs):
    torch.manual_seed(0)
    module = CanarySFTModule(tiny_llama=TINY, public_steps=2, lr=1e-2, sft_lr=2e-2, warmup_steps=1,
                             sft_warmup_steps=1, eval_during_validation=False, weight_decay=0.1,
                             **module_kwargs)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=0.5)
    dm = CanaryDataModule(seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50)
    trainer.fit(module, datamodule=dm)
    return module


def test_dense_displacements_sum_to_the_total_displacement(tmp_path):
    module = _fit(tmp_path, track_displacements=True)
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


def test_dense_without_tracking_reports_none(tmp_path):
    module = _fit(tmp_path)
    assert module.displacements() is None and module.private_update.tracker is None


def test_ogd_eta_is_reported_and_within_unit_interval(tmp_path):
    module = _fit(tmp_path, ogd=OGDConfig(subspace="flattest", fraction=0.5, kfac_batches=2))
    found = module.displacements()
    controller = module.private_update
    for name, (dw, _) in controller.delta.items():
        assert torch.equal(found.private[f"{name}.weight"], dw.detach().double())
    eta = found.entanglement()
    assert not math.isnan(eta.overall) and 0.0 <= eta.overall <= 1.0
    assert all(0.0 <= v <= 1.0 for v in eta.per_layer.values())


def test_tracking_with_isolation_fails_naming_the_setting():
    with pytest.raises(ValueError, match="track_displacements"):
        CanarySFTModule(tiny_llama=TINY, isolation=IsolationConfig(), track_displacements=True)
