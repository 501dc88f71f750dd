"""DP-SGD on the isolation support inside canary SFT: start-up checks, isolation off S,
accounting, checkpoints."""
import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from ortho_train.private_update import DPIsolationController, build_controller
from ortho_train.privacy import DPConfig
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.isolation import IsolationConfig
from tests.ortho_train.dp_helpers import PUBLIC, STEPS, TINY, dp_fit, single_thread  # noqa: F401
from tests.ortho_train.dp_helpers import dp_config as _dp, isolation_config as _isolation


@pytest.fixture(scope="module")
def two_secret_sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    return dp_fit(tmp / "a", canary_seed=1), dp_fit(tmp / "b", canary_seed=2)


def test_bad_dp_settings_fail_at_start_up_naming_the_setting():
    with pytest.raises(ValueError, match="dp needs isolation"):
        CanarySFTModule(tiny_llama=TINY, dp=_dp())
    with pytest.raises(ValueError, match="public_base_updates"):
        CanarySFTModule(tiny_llama=TINY, dp=_dp(), isolation=IsolationConfig(support="impact"))
    with pytest.raises(ValueError, match="support chosen without the canaries"):
        build_controller(dp=_dp(), isolation=_isolation(support="saliency_canary"))
    with pytest.raises(ValueError, match="public_updates_fraction"):
        build_controller(dp=_dp(scope="global"), isolation=_isolation(public_updates_fraction=0.5))
    with pytest.raises(ValueError, match="target_epsilon must be positive"):
        DPConfig(target_epsilon=0.0, expected_batch_size=2.0)
    with pytest.raises(ValueError, match="delta must lie in"):
        _dp(delta=1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        _dp(max_grad_norm=0.0)
    with pytest.raises(ValueError, match="dp.scope=.everywhere.: must be one of .support., .global."):
        _dp(scope="everywhere")
    with pytest.raises(ValueError, match="mutually exclusive"):
        from ortho_train.ogd import OGDConfig

        build_controller(dp=_dp(), isolation=_isolation(), ogd=OGDConfig())
    assert isinstance(build_controller(dp=_dp(), isolation=_isolation()), DPIsolationController)


def test_dp_leaves_the_alpha_zero_model_independent_of_the_secrets(two_secret_sets):
    a, b = two_secret_sets
    assert a.probe.members.texts != b.probe.members.texts
    with a.private_update.support.alpha_zero(a.model), b.private_update.support.alpha_zero(b.model):
        zero_a = {k: v.clone() for k, v in a.model.state_dict().items()}
        zero_b = {k: v.clone() for k, v in b.model.state_dict().items()}
    for key, value in zero_a.items():  # same computation both runs: bit equality is the claim
        assert torch.equal(value, zero_b[key]), f"{key} at α = 0 depends on the secrets"
    support = a.private_update.support
    moved = [bool((w.detach()[support.masks[n]] != a.pre_canary_state_dict[f"{n}.weight"][support.masks[n]]).any())
             for n, w in support.weights(a.model).items()]
    assert all(moved)  # the DP update did move S
    assert a.private_update.ledger.steps == STEPS - PUBLIC


def test_epsilon_in_the_summary_is_opacus_for_the_same_history(two_secret_sets, tmp_path):
    module = two_secret_sets[0]
    summary = json.loads((module.run_dir / "summary.json").read_text())
    dp = summary["dp"]
    assert dp["steps"] == STEPS - PUBLIC and dp["noise_multiplier"] == 1.0
    assert dp["sample_rate"] == pytest.approx(2 / 3) and dp["max_grad_norm"] == 0.5
    fresh = RDPAccountant()
    for _ in range(STEPS - PUBLIC):
        fresh.step(noise_multiplier=1.0, sample_rate=2 / 3)
    assert dp["epsilon"] == pytest.approx(fresh.get_epsilon(delta=1e-2), rel=1e-9)
    assert dp["delta"] == 1e-2 and dp["accountant"] == "rdp" and dp["scope"] == "support"
    assert summary["isolation"]["public_base_updates"] is True


def test_checkpoint_round_trip_continues_ledger_noise_and_draws(two_secret_sets, tmp_path):
    module = two_secret_sets[0]
    controller = module.private_update
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain tensors and numbers
    resumed = CanarySFTModule(tiny_llama=TINY, dp=_dp(), isolation=_isolation())
    resumed.trainer = module.trainer
    resumed.on_load_checkpoint(checkpoint)
    again = resumed.private_update
    assert again.ledger.steps == controller.ledger.steps == STEPS - PUBLIC
    assert again.epsilon() == controller.epsilon() and again.schedule == controller.schedule
    g1, _ = controller.dp_step.private_gradient(None)  # the next noise draw of each
    g2, _ = again.dp_step.private_gradient(None)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
    assert next(again._draws, None) is None  # the draws continue after the steps taken: none left
    assert controller.progress()["dp/epsilon"] == module.final_metrics["dp"]["epsilon"]


def test_global_scope_noises_every_trainable_weight_and_has_no_switch(tmp_path):
    module = dp_fit(tmp_path, dp=_dp(scope="global", noise_multiplier=None, target_epsilon=8.0))
    controller = module.private_update
    assert 8.0 - 0.05 < module.final_metrics["dp"]["epsilon"] <= 8.0  # σ calibrated for the phase
    assert controller.streams() is None
    assert set(controller.dp_step.masks) == {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(mask is None for mask in controller.dp_step.masks.values())
