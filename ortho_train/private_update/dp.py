"""`DPIsolationController`: isolated canary SFT whose canary update is DP-SGD on the support S.

With isolation and public base updates, the weights off S and every unsieved parameter only
ever take gradients of public text through the α = 0 model (`IsolationController`), so only
the update of S can carry a canary. Here that update is made differentially private, the
privacy unit being one member canary. Per optimiser step t of the canary phase:

    B_t      ~ Poisson(q): each of the n members joins independently with probability q
    g_pub    = the isolation controller's public gradient (α = 0 off S, the full model on S),
               clipped as it clips it
    g̃_t      = (Σ_{b∈B_t} clip_C(∇_S ℓ(θ; x_b)) + N(0, σ²C²·I_S)) / (q·n)     (SupportDPStep)
    .grad    = g_pub + g̃_t        (g̃_t is zero off S)

then the optimiser's step (AdamW is post-processing of the released g̃). The fixed canary half
of the training batch is no longer trained on (its loss is only logged). σ is calibrated by
opacus' accountant for the target ε after T = the canary phase's steps (or given), and the
ledger records every step at (σ, q): ε(δ) after t steps is the accountant's, logged each epoch
and validation and reported in summary.json under `dp`.

`scope: global` is the baseline at the same ε: the same g̃ on every trainable weight (the
support then only sets what the public update does). Its α = 0 model carries canary
information, so it has no kill switch and `streams()` gives none.

Requirements checked at start-up: `isolation.public_base_updates` (otherwise the weights off S
would train on canaries without noise), a support chosen without the canaries (a support from
canary gradients is itself a non-private function of the secrets), and for the global scope
`public_updates_fraction: 1` (after a base freeze only S trains, the noise would stop being
global).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import torch

from ortho_train import metrics
from ortho_train.token_datasets import pad_collate
from ortho_train.private_update.controller import TrainingLoss, register
from ortho_train.private_update.isolation import IsolationController
from ortho_train.private_update.streams import SupportStreams
from ortho_train.privacy import (
    DPConfig,
    DPSchedule,
    DPStepStats,
    PrivacyLedger,
    SupportDPStep,
    module_masks_to_params,
)
from ortho_train.sieve.isolation import IsolationConfig
from ortho_train.sieve.support import support_choice


def example_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL per label token of one canary (the per-example loss of DP-SGD)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, mask = metrics.token_logprobs(logits, batch["labels"])
    return -(logp * mask).sum() / mask.sum()


@register("dp")
class DPIsolationController(IsolationController):
    """DP-SGD on the isolation support (see the module docstring).

    Args:
        dp: the DP settings (`ortho_train.privacy.DPConfig`).
        isolation: the isolation settings the DP update builds on.
    """

    config_class = DPConfig
    builds_on = "isolation"

    def __init__(self, dp: DPConfig, isolation: IsolationConfig):
        if not isolation.public_base_updates:
            raise ValueError("model.dp needs model.isolation.public_base_updates: true (without it "
                             "the weights off the support would not be kept to public text)")
        if support_choice(isolation.support).sees_canaries:
            raise ValueError(f"model.dp needs a model.isolation.support chosen without the canaries, got "
                             f"{isolation.support!r}: the support itself would leak the secrets")
        if dp.scope == "global" and isolation.public_updates_fraction != 1.0:
            raise ValueError("model.dp.scope global needs model.isolation.public_updates_fraction: 1.0 "
                             "(after the base freezes only the support trains; the noise would stop "
                             "being global)")
        super().__init__(isolation)
        self.dp = dp
        self.schedule: DPSchedule | None = None
        self.ledger: PrivacyLedger | None = None
        self.dp_step: SupportDPStep | None = None
        self.last_stats: DPStepStats | None = None
        self._draws: Iterator[list[int]] | None = None

    def check_processes(self, world_size: int) -> None:
        """One process only: the accountant's ε holds for one Poisson sampler of the members and
        one noise draw per step; under DDP every rank would draw its own batch and noise."""
        if world_size > 1:
            raise ValueError(f"model.dp (DP-SGD) runs in one process, got {world_size} (trainer.devices / "
                             "trainer.num_nodes): its privacy accountant assumes one Poisson sampler of the "
                             "member canaries and one noise draw per step; run it with --trainer.devices=1")

    # ---------------------------------------------------------------- phases
    def fit_start(self) -> None:
        """Resolve σ for the run (unless a checkpoint brought it) and check that per-example
        gradients of this model work, before any training."""
        host = self.host
        if self.schedule is None:
            steps = host.trainer.max_steps - host.hparams.public_steps
            self.schedule = self.dp.resolve(num_members=len(host.probe.members), steps=steps)
        first = self._collate([0])
        SupportDPStep(host.model, None, example_nll, max_grad_norm=self.dp.max_grad_norm,
                      noise_multiplier=self.schedule.noise_multiplier,
                      expected_batch_size=self.schedule.expected_batch_size).validate(first)
        s = self.schedule
        self.host.info(f"DP-SGD on {self.dp.scope}: σ={s.noise_multiplier:.4f}, q={s.sample_rate:.4f} "
                       f"(E|B|={s.expected_batch_size:g} of {s.num_members} members), C={s.max_grad_norm}, "
                       f"{s.steps} steps, δ={s.delta:g}, accountant {s.accountant}")

    def enter_canary_phase(self) -> None:
        super().enter_canary_phase()
        self._build_step()
        self.ledger = self.schedule.ledger()
        self._draws = iter(self.schedule.sampler())

    def _build_step(self) -> None:
        masks = (module_masks_to_params(self.support.masks) if self.dp.scope == "support" else None)
        self.dp_step = SupportDPStep.from_schedule(self.host.model, masks, example_nll, self.schedule)

    # -------------------------------------------------------------- training
    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor] | None:
        if not indices:
            return None
        probe = self.host.probe
        batch = pad_collate([probe.members.full_ids[i] for i in indices], probe.pad_token_id)
        device = next(self.host.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def training_loss(self, batch) -> TrainingLoss:
        """Backward runs on the public batch alone; the canaries enter through `clip` (DP)."""
        self.collect_public_grads(batch["public"])
        nll, tokens = self.host.nll_sum(batch["public"])
        with torch.no_grad():  # logged only: the fixed canary half is not trained on
            canary_nll, canary_tokens = self.host.nll_sum(batch["canary"])
        loss = nll / tokens
        return TrainingLoss(loss, loss, canary_nll / canary_tokens)

    def clip(self, optimizer, max_norm, algorithm) -> None:
        """The public gradient is clipped as isolation clips it; then g̃ is added (already
        clipped per example: clipping it again would change its noise scale)."""
        super().clip(optimizer, max_norm, algorithm)
        if self.host.in_canary_phase:
            self._add_private_gradient()

    @torch.no_grad()
    def _add_private_gradient(self) -> None:
        try:
            indices = next(self._draws)
        except StopIteration:
            raise RuntimeError(f"dp: more canary steps than the {self.schedule.steps} the noise was "
                               f"calibrated for (trainer.max_steps changed?)") from None
        grads, self.last_stats = self.dp_step.private_gradient(self._collate(indices))
        self.ledger.step()  # the noise is released whether or not the batch was empty
        params = dict(self.host.model.named_parameters())
        for name, g in grads.items():
            p = params[name]
            if not p.requires_grad:
                continue
            mask = self.dp_step.masks[name]
            if p.grad is None:
                p.grad = g.clone()
            elif mask is None:
                p.grad.add_(g)
            else:  # off S the public gradient stays bit for bit
                p.grad.copy_(torch.where(mask, p.grad + g, p.grad))

    # ------------------------------------------------------------- artifacts
    def streams(self) -> SupportStreams | None:
        """The isolated streams; none for the global scope (its α = 0 model saw the canaries)."""
        return super().streams() if self.dp.scope == "support" else None

    def epsilon(self) -> float:
        return 0.0 if self.ledger is None else self.ledger.epsilon()

    def dp_summary(self) -> dict | None:
        if self.ledger is None:
            return None
        s = self.schedule
        return {**self.ledger.report(), "max_grad_norm": s.max_grad_norm, "scope": self.dp.scope,
                "target_epsilon": self.dp.target_epsilon, "expected_batch_size": s.expected_batch_size,
                "num_members": s.num_members, "scheduled_steps": s.steps,
                "expected_presentations_per_member": s.sample_rate * self.ledger.steps,
                "privacy_unit": "one member canary"}

    def summary_entries(self) -> dict[str, dict]:
        isolation, dp = self.summary(), self.dp_summary()
        return ({} if isolation is None else {"isolation": isolation}) | ({} if dp is None else {"dp": dp})

    def progress(self) -> dict[str, float]:
        if self.ledger is None:
            return {}
        out = {"dp/epsilon": self.epsilon(), "dp/steps": float(self.ledger.steps)}
        if self.last_stats is not None:
            out["dp/clipped_fraction"] = self.last_stats.clipped_fraction
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.ledger is not None:
            state["dp"] = {"schedule": dataclasses.asdict(self.schedule), "ledger": self.ledger.state_dict(),
                           "noise": self.dp_step.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume with the checkpoint's σ (no recalibration), its ledger, the noise generator
        where it stopped, and the Poisson draws continued after the steps already taken."""
        super().load_state_dict(state)
        if "dp" not in state:
            return
        self.schedule = DPSchedule(**state["dp"]["schedule"])
        self.ledger = self.schedule.ledger()
        self.ledger.load_state_dict(state["dp"]["ledger"])
        self._build_step()
        self.dp_step.load_state_dict(state["dp"]["noise"])
        self._draws = itertools.islice(iter(self.schedule.sampler()), self.ledger.steps, None)
