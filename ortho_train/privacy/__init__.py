"""Privacy on the private stream: DP-SGD on a support, post-hoc weight noise, stochastic
quantisation (the DSM sensitivity score is the sieve's: `ortho_train.sieve.dsm`).

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
    SCOPES,
    SupportDPStep,
    clip_per_example,
    module_masks_to_params,
)
from ortho_train.privacy.poisson import PoissonCanarySampler
from ortho_train.privacy.posthoc_noise import MODES, apply_posthoc_noise_, layer_rms, posthoc_noise
from ortho_train.privacy.stochastic_quant import (
    StochasticQuantConfig,
    discrete_gaussian,
    paper_epsilon,
    stochastic_codes,
    stochastic_quantise,
    stochastic_quantise_model,
)

__all__ = [
    "ACCOUNTANTS", "DPConfig", "DPSchedule", "DPStepStats", "MODES",
    "PoissonCanarySampler", "PrivacyLedger", "SCOPES", "StochasticQuantConfig", "SupportDPStep",
    "apply_posthoc_noise_", "calibrate_noise_multiplier", "clip_per_example",
    "discrete_gaussian",
    "layer_rms", "module_masks_to_params", "paper_epsilon", "posthoc_noise",
    "stochastic_codes", "stochastic_quantise", "stochastic_quantise_model",
]
