"""`IsolationController`: canary SFT that may move only a sparse support S fixed at the switch.

At the switch it fixes S per linear layer *before* any canary is trained on, quantises the
public weights into the base stream and freezes everything else (`ortho_train.sieve.isolation`);
during the canary phase gradients are masked to S and the off-S entries are written back after
every optimiser step. With `public_base_updates` the weights off S keep learning from the public
batches through the α = 0 model (`ortho_train.sieve.public_updates`), and at
`public_updates_fraction` of the phase the base is re-quantised and frozen.

`support` holds the masks, the bases and the frozen values; `streams()` gives the sieve table
the isolated streams at the current weights.

Under DDP the freezing happens after the model was wrapped (`freezes_parameters`: the module
has DDP detect unused parameters); the gradient masks are tensor hooks, so they act before
DDP's all-reduce; the support and a re-quantised base come from rank zero, and the α = 0
public gradients are averaged over the ranks before they are merged.
"""
from __future__ import annotations

import math

import torch
from ortho_train.token_datasets import pad_collate
from ortho_train.distributed import average_gradients_, broadcast_from_zero
from ortho_train.private_update.controller import PrivateUpdateController, TrainingLoss, register
from ortho_train.private_update.public_kl import AlphaZeroTargets
from ortho_train.private_streams import SupportStreams
from ortho_train.progress_lines import phase
from ortho_train.sieve import public_updates
from ortho_train.sieve.isolation import IsolatedSupport, IsolationConfig, apply_isolation, build_isolation
from ortho_train.sieve.support import support_choice


@register("isolation")
class IsolationController(PrivateUpdateController):
    """Isolation by construction (see the module docstring); `config` is an `IsolationConfig`."""

    config_class = IsolationConfig
    needs_float32_linears = True
    freezes_parameters = True  # at the switch, and again at a base freeze

    def __init__(self, config: IsolationConfig):
        super().__init__(config)
        self.support: IsolatedSupport | None = None
        self._grad_hooks: list = []
        self._public_grads: dict[int, torch.Tensor | None] | None = None
        self._final_bases: tuple[int, dict] | None = None  # (step, public bases) cache
        self._public_updates_done = False  # the base was re-quantised and frozen mid-phase
        self._before: dict[int, torch.Tensor] | None = None  # weights before the step, for public_lr
        self._ratio = 1.0
        self._targets = AlphaZeroTargets()  # α = 0 log-probs of the public batch (canaries_kl)

    # --------------------------------------------------------------- batches
    def _public_batches(self):
        return self.host.trainer.datamodule.public_train_dataloader()

    def _canary_batches(self):
        """Every member canary once per batch (deterministic: no shuffling, no RNG)."""
        probe = self.host.probe
        batch = pad_collate(probe.members.full_ids, probe.pad_token_id)
        return [batch] * self.config.saliency_batches

    def _batch_nll(self, model, batch) -> torch.Tensor:
        return self.host.batch_nll(batch)

    # ---------------------------------------------------------------- phases
    def enter_canary_phase(self) -> None:
        """Fix S, quantise the public weights, freeze the rest (same on every rank)."""
        host, cfg = self.host, self.config
        with torch.random.fork_rng(), phase("isolation set-up: curvature, INT4 base, support"):
            # drawing calibration batches must not shift training RNG
            support = build_isolation(host.model, cfg, self._public_batches,
                                      self._canary_batches, self._batch_nll)
        self.support = broadcast_from_zero(host.trainer.strategy, support)
        self._activate(initial=True)
        self.host.info(
            f"isolated SFT: support={cfg.support} (sees {support_choice(cfg.support).sees}), "
            f"rho={cfg.rho}, {len(self.support.masks)} layers, base {cfg.quant.method} "
            f"INT{cfg.quant.bits}/g{cfg.quant.group_size}, train_on_base={cfg.train_on_base}, "
            f"public_base_updates={cfg.public_base_updates}"
        )

    @property
    def public_base_updates(self) -> bool:
        """The canary phase also trains everything off S on public batches (α = 0 model)."""
        return self.support is not None and self.config.public_base_updates and not self._public_updates_done

    def before_batch(self, step: int) -> None:
        """At `public_updates_fraction` of the canary phase: re-quantise the public-trained
        base, freeze it, and continue with S alone (quantisation-aware)."""
        host = self.host
        if not (self.public_base_updates and host.in_canary_phase):
            return
        canary_steps = host.trainer.max_steps - host.hparams.public_steps
        switch = host.hparams.public_steps + math.ceil(self.config.public_updates_fraction * canary_steps)
        if step < switch:
            return
        bases = broadcast_from_zero(host.trainer.strategy, self._requantised_public_bases())
        self.support.freeze_base(host.model, bases)
        self._public_updates_done = True
        self._activate(initial=True)
        self.host.info(f"isolated SFT: base re-quantised after public updates and frozen at step "
                       f"{step}; the support alone trains from here")

    def _requantised_public_bases(self) -> dict:
        """Q of the α = 0 weights after public updates (calibration draws leave the RNG as it was)."""
        with torch.random.fork_rng():
            return self.support.public_bases(self.host.model, self.config, self._public_batches)

    def _activate(self, initial: bool) -> None:
        """Freeze/mask as the isolation mode wants. On resume (`initial=False`) with public
        base updates the off-S weights are trained values and are left as they are."""
        model, trainer = self.host.model, self.host.trainer
        if self.public_base_updates:
            if trainer.accumulate_grad_batches > 1:
                raise ValueError("isolation.public_base_updates supports accumulate_grad_batches=1 "
                                 "(it replaces gradients after backward)")
            if initial:
                apply_isolation(model, self.support, freeze_rest=False)
        else:
            apply_isolation(model, self.support)
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = [] if self.public_base_updates else self.support.mask_gradients(model)

    def _masks_by_param(self) -> dict[int, torch.Tensor]:
        return public_updates.support_masks_by_param(self.host.model, self.support)

    # -------------------------------------------------------------- training
    def collect_public_grads(self, public: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """With public base updates: ∇ of the public batch through the α = 0 model, kept for
        `after_backward`; returns that batch's mean NLL (None without public updates). Under
        'canaries_kl' the same pass keeps the α = 0 log-probs as the KL targets."""
        if not self.public_base_updates:
            return None
        model = self.host.model
        if self.config.support_objective == "canaries_kl":
            loss = lambda: self._targets.nll_and_keep(model, self._on_device(public))  # noqa: E731
        else:
            loss = lambda: self.host.batch_nll(public)  # noqa: E731
        self._public_grads, public_nll = public_updates.alpha_zero_public_grads(model, self.support, loss)
        return public_nll

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.host.device) for k, v in batch.items()}

    def training_loss(self, batch) -> TrainingLoss:
        """With public base updates, first ∇ of the public batch through the α = 0 model; then
        the loss S learns from (`IsolationConfig.support_objective`):

        - 'batch': the whole batch's token-mean NLL (the default controller's loss);
        - 'canaries': the canaries' mean NLL alone;
        - 'canaries_kl': the canaries' mean NLL + λ·KL(α = 0 ‖ α = 1) on the public batch
          (`ortho_train.private_update.public_kl`).

        `train/loss` is always the token-weighted public + canary NLL: of the full model under
        'canaries_kl', else of the α = 0 pass (or of a no-grad full pass once the base is frozen).
        """
        objective = self.config.support_objective
        public_nll = self.collect_public_grads(batch["public"])
        if objective == "batch":
            return super().training_loss(batch)
        public = self._on_device(batch["public"])
        if objective == "canaries_kl" and public_nll is None:
            # base frozen, or no public updates: one no-grad α = 0 pass, before any graph is
            # built (alpha_zero writes the weights in place)
            with self.support.alpha_zero(self.host.model):
                self._targets.refresh(self.host.model, public)
        canary_nll, canary_tokens = self.host.nll_sum(batch["canary"])
        canary_loss = canary_nll / canary_tokens
        public_tokens = (batch["public"]["labels"][:, 1:] != -100).sum()  # the NLL's shifted labels
        loss = canary_loss
        if objective == "canaries_kl":
            kl, public_nll = self._targets.kl(self.host.model, public)
            loss = canary_loss + self.config.public_kl_weight * kl
        elif public_nll is None:
            with torch.no_grad():
                public_nll = self.host.batch_nll(batch["public"])
        logged = (public_nll * public_tokens + canary_nll.detach()) / (public_tokens + canary_tokens)
        extra = {"public_kl": kl.detach()} if objective == "canaries_kl" else {}
        return TrainingLoss(loss, logged, canary_loss.detach(), extra)

    def after_backward(self) -> None:
        """Public base updates: off S and unsieved parameters take the α = 0 public gradient,
        S keeps the gradient of the whole batch. Under DDP the public gradients are averaged
        over the ranks first (the backward's already are), so every rank merges the same."""
        if self._public_grads is not None:
            average_gradients_(list(self._public_grads.values()))
            public_updates.merge_public_grads_(self.host.model, self._public_grads, self._masks_by_param())
            self._public_grads = None

    def clip(self, optimizer, max_norm, algorithm) -> None:
        if self.public_base_updates and self.host.in_canary_phase and max_norm:
            if algorithm not in (None, "norm"):
                raise ValueError("isolation.public_base_updates clips by norm only")
            public_updates.clip_split_([p for p in self.host.model.parameters() if p.requires_grad],
                                       self._masks_by_param(), float(max_norm))
            return
        super().clip(optimizer, max_norm, algorithm)

    def _public_lr_ratio(self) -> float:
        if not (self.public_base_updates and self.host.in_canary_phase) or self.config.public_lr is None:
            return 1.0
        return self.config.public_lr / self.host.hparams.sft_lr

    def before_step(self) -> None:
        self._ratio, self._before = self._public_lr_ratio(), None
        if self._ratio != 1.0:  # the update off S at public_lr: scale it after AdamW's step
            self._before = {id(p): p.detach().clone() for p in self.host.model.parameters() if p.requires_grad}

    def after_step(self) -> None:
        if self._before is not None:
            public_updates.scale_public_update_(self.host.model, self._before, self._ratio,
                                                self._masks_by_param())
            self._before = None
        if self.support is not None and not self.public_base_updates:
            self.support.restore_off_support(self.host.model)  # undoes weight decay off S

    # ------------------------------------------------------------- artifacts
    def streams(self) -> SupportStreams | None:
        """The isolated sieve at the current weights: the bases fixed at the switch, Q(W_pre),
        or with public base updates Q of the public-trained α = 0 weights (re-quantised once
        per step)."""
        if self.support is None:
            return None
        cfg, step = self.config, self.host.trainer.global_step
        if not self.public_base_updates:
            return SupportStreams(self.support.masks, self.support.bases, cfg.rho,
                                  not self._public_updates_done, cfg.support)
        if self._final_bases is None or self._final_bases[0] != step:
            self._final_bases = (step, self._requantised_public_bases())
        return SupportStreams(self.support.masks, self._final_bases[1], cfg.rho, False, cfg.support)

    def summary(self) -> dict | None:
        if self.support is None:
            return None
        cfg = self.config
        return {
            "support": cfg.support, "support_sees": support_choice(cfg.support).sees, "rho": cfg.rho,
            "density": self.support.density,
            # with public base updates the weights off S train on public text by design
            "off_support_max_drift": (None if self.public_base_updates
                                      else self.support.off_support_drift(self.host.model)),
            "base": f"int{cfg.quant.bits}_{cfg.quant.method}", "train_on_base": cfg.train_on_base,
            "public_base_updates": cfg.public_base_updates,
            "public_updates_fraction": cfg.public_updates_fraction if cfg.public_base_updates else None,
        }

    def state_dict(self) -> dict:
        if self.support is None:
            return {}
        return {"isolated_support": self.support.state(), "public_updates_done": self._public_updates_done}

    def load_state_dict(self, state: dict) -> None:
        if "isolated_support" not in state:
            return
        self.support = IsolatedSupport.from_state(state["isolated_support"])
        self._public_updates_done = state.get("public_updates_done", False)
        self._activate(initial=False)
