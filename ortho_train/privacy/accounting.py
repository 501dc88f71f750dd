"""Privacy accounting for DP-SGD with Poisson sampling: opacus' accountants, not our own.

The mechanism of one step is the Poisson-subsampled Gaussian mechanism: each member joins the
step's batch independently with probability q, every example's gradient is clipped to norm C,
the sum gets N(0, σ²C²) noise. Composed over T steps its (ε, δ) curve is what opacus'
`RDPAccountant` (Rényi DP of the subsampled Gaussian, Mironov et al. 2019, converted to
(ε, δ)) or `PRVAccountant` (numerical composition of privacy-loss random variables, Gopi et
al. 2021; opacus returns its upper bound) computes from the history (σ, q, T). Nothing here
re-implements that analysis: `PrivacyLedger` records the steps and asks the accountant, and
`calibrate_noise_multiplier` is `opacus.accountants.utils.get_noise_multiplier` (binary search
for the smallest σ whose ε after T steps is ≤ the target).

The privacy unit is one member (one canary): ε bounds what one canary's presence changes in
the whole sequence of released gradients, hence in everything computed from them.
"""
from __future__ import annotations

import warnings
from typing import Literal, get_args

from ortho_train.settings import check_choices

Accountant = Literal["rdp", "prv"]
ACCOUNTANTS = get_args(Accountant)


def check_accountant(name: str) -> str:
    check_choices("dp", accountant=(name, Accountant))
    return name


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "rdp", epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier σ reaching ε ≤ `target_epsilon` at `delta` after `steps` steps of
    sampling rate q = `sample_rate` (opacus' `get_noise_multiplier`)."""
    if steps < 1:
        raise ValueError(f"dp steps must be ≥ 1 to calibrate the noise, got {steps}")
    # opacus' package import loads its whole training engine (seconds): only when accounting runs
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=check_accountant(accountant),
                                      epsilon_tolerance=epsilon_tolerance))


def rdp_epsilon_floor(delta: float) -> float:
    """The least ε opacus' RDP accountant reports at `delta` for any σ, q and T: with the Rényi
    divergences → 0 (σ → ∞) its conversion to (ε, δ) still costs log(1/δ)/(α − 1) − … at its
    largest order α (63). A target at or below it is unreachable, whatever the run's length."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():  # "optimal order is the largest alpha": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        return float(get_privacy_spent(orders=orders, rdp=[0.0] * len(orders), delta=delta)[0])


class PrivacyLedger:
    """The steps taken so far and the ε(δ) they cost, from an opacus accountant.

        ledger = PrivacyLedger(noise_multiplier=1.1, sample_rate=0.25, delta=1e-3)
        for _ in range(steps):
            ...; ledger.step()
        ledger.epsilon()            # ε at the configured δ

    Every recorded step is a Poisson-subsampled Gaussian step with the given σ and q (an empty
    batch is still a step: its noise is released all the same).
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float,
                 accountant: str = "rdp"):
        if not noise_multiplier > 0:
            raise ValueError(f"dp noise_multiplier must be positive, got {noise_multiplier}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"dp sample_rate must lie in (0, 1], got {sample_rate}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"dp delta must lie in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.accountant_name = check_accountant(accountant)
        from opacus.accountants import create_accountant  # see calibrate_noise_multiplier

        self.accountant = create_accountant(mechanism=self.accountant_name)

    @property
    def steps(self) -> int:
        return sum(count for _, _, count in self.accountant.history)

    def step(self, count: int = 1) -> None:
        """Record `count` steps at the ledger's (σ, q)."""
        for _ in range(count):
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at δ (default: the ledger's); 0.0 before the first step."""
        if self.steps == 0:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.delta if delta is None else delta))

    def report(self) -> dict:
        """Plain numbers for a log or a table row."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "steps": self.steps,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "accountant": self.accountant_name}

    def state_dict(self) -> dict:
        return {"history": list(self.accountant.history)}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.history = [tuple(h) for h in state["history"]]
