"""Privacy on the private stream: DP-SGD on a support, post-hoc weight noise, stochastic
quantisation, and the DSM sensitivity score.

    config = DPConfig(target_epsilon=4.0, delta=1e-3, expected_batch_size=5)
    schedule = config.resolve(num_members=20, steps=200)     # σ from opacus' accountant
    step = SupportDPStep.from_schedule(model, masks, loss_fn, schedule)
    ledger = schedule.ledger()
    for indices in schedule.sampler():                        # Poisson sampling
        step(collate(indices)); optimizer.step(); ledger.step()
    ledger.epsilon()

Only DP-SGD gives an (ε, δ) guarantee. Post-hoc noise is a noise scale without an ε, and
stochastic quantisation's ε is a formula of a sensitivity that training does not bound.
"""
from ortho_train.privacy.accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise_multiplier
from ortho_train.privacy.dp_sgd import (
    DPConfig,
    DPSchedule,
    DPStepStats,
    SupportDPStep,
    clip_per_example,
    module_masks_to_params,
)
from ortho_train.privacy.poisson import PoissonCanarySampler

__all__ = [
    "ACCOUNTANTS", "DPConfig", "DPSchedule", "DPStepStats", "PoissonCanarySampler", "PrivacyLedger",
    "SupportDPStep", "calibrate_noise_multiplier", "clip_per_example", "module_masks_to_params",
]
