"""The `dsm` isolation support: whole DSM columns of W_pre, exactly ρ, from public text only.

DSM is the differentiated sensitivity metric of "A Geometric Theory of Functionally Sensitive
Outlier Separability" (`ortho_train.sieve.dsm`). A support chosen from the canaries' gradients
would leak where the secrets are; this one must not depend on the canaries at all.
"""
import math

import pytest
import torch

from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers
from ortho_train.sieve.dsm import DSMConfig
from ortho_train.quantisation import QuantConfig
from ortho_train.sieve import support as supports
from ortho_train.sieve.isolation import IsolationConfig, build_isolation

TINY = TinyLlamaConfig(32, 2, 2, 64)


def _datamodule(canary_seed: int) -> CanaryDataModule:
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50,
                          canary_seed=canary_seed)
    dm.setup("fit")
    return dm


def _loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss


def _no_canaries():
    raise AssertionError("the dsm support drew canary batches")


def _dsm_masks(dm: CanaryDataModule, rho: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the model and the shuffle of the public loader
    model = build_tiny_llama(TINY, len(dm.tokenizer), 0, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = IsolationConfig(support="dsm", rho=rho, quant=QuantConfig("rtn", 4, 32), calibration_batches=2,
                          dsm=DSMConfig(probes=2))
    iso = build_isolation(model, cfg, dm.public_train_dataloader, _no_canaries, _loss)
    assert set(iso.masks) == set(linear_layers(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # choosing S does not touch the model
    return iso.masks


@pytest.fixture(scope="module")
def masks_by_seed():
    return {seed: _dsm_masks(_datamodule(seed), rho=0.125) for seed in (1, 2)}


def test_dsm_support_is_exactly_rho_of_each_layer_in_whole_columns(masks_by_seed):
    for name, mask in masks_by_seed[1].items():
        n, k = mask.shape
        assert mask.dtype == torch.bool
        assert int(mask.sum()) == math.ceil(0.125 * n * k), name  # N·K/8: whole columns exactly
        per_column = mask.sum(dim=0)  # (K,)
        assert bool(((per_column == 0) | (per_column == n)).all()), name  # every column all or nothing


def test_dsm_support_at_a_rho_that_splits_a_column():
    masks = _dsm_masks(_datamodule(1), rho=0.05)
    for name, mask in masks.items():
        n, k = mask.shape
        assert int(mask.sum()) == math.ceil(0.05 * n * k), name
        per_column = mask.sum(dim=0)
        assert int(((per_column > 0) & (per_column < n)).sum()) <= 1, name  # at most one partial column


def test_dsm_support_is_deterministic_and_independent_of_the_canaries(masks_by_seed):
    dm_1, dm_2 = _datamodule(1), _datamodule(2)
    assert dm_1.probe.members.texts != dm_2.probe.members.texts  # other secrets
    again = _dsm_masks(dm_1, rho=0.125)
    for name, mask in masks_by_seed[1].items():
        assert torch.equal(mask, again[name]), name  # same run twice: the same S
        assert torch.equal(mask, masks_by_seed[2][name]), name  # other secrets: the same S


def test_dsm_settings_belong_to_the_dsm_support():
    assert IsolationConfig(support="dsm").dsm is None  # the defaults of DSMConfig
    with pytest.raises(ValueError, match="isolation dsm"):
        IsolationConfig(support="impact", dsm=DSMConfig(probes=4))
    with pytest.raises(ValueError, match="probes"):
        IsolationConfig(support="dsm", dsm=DSMConfig(probes=0))
    assert not supports.support_choice("dsm").sees_canaries
    assert "public" in supports.support_choice("dsm").sees


def test_a_new_support_is_one_registered_function_and_draws_no_canary_unless_it_says_so():
    @supports.register_support("first_columns_for_test", sees="nothing (test)")
    def first_columns(inputs):
        inputs.canary_batches()  # not registered as seeing them: refused
        return {}

    try:
        cfg = IsolationConfig(support="first_columns_for_test", quant=QuantConfig("rtn", 4, 16))
        model = build_tiny_llama(TinyLlamaConfig(16, 1, 2, 32), 40, 0, 1)
        with pytest.raises(RuntimeError, match="sees_canaries=True"):
            build_isolation(model, cfg, lambda: [], lambda: [], _loss)
        with pytest.raises(ValueError, match="registered already"):
            supports.register_support("random", sees="nothing")(first_columns)
    finally:
        del supports.SUPPORTS["first_columns_for_test"]
    with pytest.raises(ValueError, match=r"isolation.support='first_columns_for_test': must be one of 'impact'"):
        IsolationConfig(support="first_columns_for_test")
