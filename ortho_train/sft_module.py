"""`CanarySFTModule`: plant memorisation by canary SFT, measure it, save the models.

Two phases within one `fit`, split at `public_steps`:
1. public warm-up: causal-LM training on public windows only. At its end the weights are the
   "public" (pre-canary) model: kept in memory (`pre_canary_state_dict`), saved in Hugging Face
   format to `<run>/hf_model_pre_canary`, and their public perplexity recorded.
2. canary SFT: every step adds `canary_batch_size` member canaries to the public batch; the
   loss is the token-weighted mean NLL over both. The optimiser state is reset at the switch
   and the learning rate follows its own warm-up + cosine schedule (`sft_lr`).

Training ends at `trainer.max_steps` (the single source of truth for the run length). At the
end the fine-tuned model goes to `<run>/hf_model` and the memorisation metrics to
`<run>/summary.json` (DESIGN.md §3), on rank zero only, with the plot data of the report
beside it: `roc.json` (MIA ROC rates) and `exposure_refs.json` (histogram of the reference
secrets' log-perplexities, its skew-normal fit, the members' log-perplexities).

Isolated mode (`isolation`, issue #3): at the switch the module fixes a sparse support S per
linear layer *before* any canary is trained on, quantises the public weights into the base
stream, and from then on only the entries on S move (`ortho_train.sieve.isolation`). The
public attribute `isolated_support` then holds the masks, the bases and the frozen values,
which the `SieveCallback` turns into the `isolated` sieve.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchmetrics import MeanMetric

from ortho_train import metrics
from ortho_train.artifacts import atomic_directory, write_json_atomic
from ortho_train.evaluation import evaluate_memorisation, exposure_reference_histogram, mia_roc_curves
from ortho_train.evaluation import pad_collate
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, count_parameters, load_causal_lm
from ortho_train.sieve import public_updates
from ortho_train.sieve.isolation import IsolatedSupport, IsolationConfig, apply_isolation, build_isolation
from ortho_train.sieve.support import SUPPORT_SEES
from ortho_train.tokenization import BYTE_TOKENIZER, load_tokenizer

SUMMARY_KEYS = (
    "extraction_rate", "holdout_extraction_rate", "exposure_mean", "public_ppl",
    "public_ppl_before_canaries", "mia_auc_loss", "mia_auc_mink", "mia_auc_minkpp", "mia_auc_zlib",
)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CanarySFTModule(L.LightningModule):
    """Causal-LM training on public text, then on public text + secret canaries.

    Args:
        model_path: local Hugging Face causal-LM directory; None builds a tiny Llama from
            `tiny_llama` with the byte tokenizer.
        tiny_llama: size of the Llama built when `model_path` is None.
        public_steps: public-only warm-up steps before canaries are mixed in (0: none).
        lr: peak learning rate of the public phase (AdamW).
        sft_lr: peak learning rate of the canary phase.
        warmup_steps: linear warm-up steps of the public phase.
        sft_warmup_steps: linear warm-up steps of the canary phase.
        min_lr_ratio: cosine floor as a fraction of the peak.
        weight_decay: AdamW decoupled weight decay (not applied to norms/biases).
        betas: AdamW betas.
        val_exposure_references: reference secrets used for exposure at validation (cheap);
            the final evaluation uses all of the data module's references.
        eval_during_validation: compute memorisation metrics at each validation in the canary phase.
        model_seed: seeds the initialisation of a model built from a config.
        isolation: restrict the canary phase to a sparse support fixed at the switch (None:
            dense SFT). See `ortho_train.sieve.isolation.IsolationConfig`.
    """

    def __init__(
        self,
        model_path: str | None = None,
        tiny_llama: TinyLlamaConfig | None = None,
        public_steps: int = 600,
        lr: float = 3e-3,
        sft_lr: float = 1e-3,
        warmup_steps: int = 50,
        sft_warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        val_exposure_references: int = 1000,
        eval_during_validation: bool = True,
        model_seed: int = 0,
        isolation: IsolationConfig | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if public_steps < 0:
            raise ValueError(f"public_steps must be ≥ 0, got {public_steps}")
        self.tokenizer = load_tokenizer(model_path or BYTE_TOKENIZER)
        if model_path is None:
            self.model = build_tiny_llama(
                tiny_llama or TinyLlamaConfig(), len(self.tokenizer),
                self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, seed=model_seed,
            )
        else:
            self.model = load_causal_lm(model_path).train()  # from_pretrained returns eval mode
        self.val_nll = MeanMetric()
        self.pre_canary_state_dict: dict[str, torch.Tensor] | None = None
        self.public_ppl_before_canaries: float | None = None
        self.final_metrics: dict[str, float] | None = None
        self.isolation = isolation
        self.isolated_support: IsolatedSupport | None = None
        self._grad_hooks: list = []
        self._public_grads: dict[int, torch.Tensor | None] | None = None
        self._final_bases: tuple[int, dict] | None = None  # (step, public bases) cache
        self._public_updates_done = False  # the base was re-quantised and frozen mid-phase
        self._run_dir: Path | None = None

    # ----------------------------------------------------------------- phases
    @property
    def in_canary_phase(self) -> bool:
        return self.global_step >= self.hparams.public_steps

    @property
    def run_dir(self) -> Path:
        """Where artifacts go: the trainer's log directory (the first logger's version dir).

        Resolved once at fit start on every rank: `trainer.log_dir` is a collective
        (broadcast from rank zero), so it must not be called inside rank-zero-only code.
        """
        if self._run_dir is None:
            raise RuntimeError("run_dir is known once fit has started")
        return self._run_dir

    @property
    def probe(self):
        return self.trainer.datamodule.probe

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "probe"):
            raise ValueError("CanarySFTModule needs a CanaryDataModule (trainer.datamodule)")
        if len(datamodule.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"data tokenizer has {len(datamodule.tokenizer)} tokens but the model's embedding "
                f"only {self.model.get_input_embeddings().num_embeddings}: use the model's tokenizer"
            )

    def on_fit_start(self) -> None:
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        total = self.trainer.max_steps
        if total is None or total <= self.hparams.public_steps:
            raise ValueError(
                f"trainer.max_steps ({total}) must exceed model.public_steps "
                f"({self.hparams.public_steps}): the canary phase would be empty"
            )
        rank_zero_info(
            f"CanarySFTModule: {count_parameters(self.model) / 1e6:.2f}M parameters; "
            f"{self.hparams.public_steps} public steps then {total - self.hparams.public_steps} canary steps"
        )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == self.hparams.public_steps and self.pre_canary_state_dict is None:
            self._enter_canary_phase()
        self._maybe_freeze_public_base()

    def _enter_canary_phase(self) -> None:
        """Snapshot the public model, save it, measure its perplexity, reset the optimiser."""
        self.pre_canary_state_dict = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()  # SFT starts with fresh moments, as a separate fine-tune would
        self._save_hf_model("hf_model_pre_canary")
        self._record_pre_canary_ppl()
        if self.isolation is not None:
            self._isolate()

    # --------------------------------------------------------------- isolation
    def _public_batches(self):
        return self.trainer.datamodule.public_train_dataloader()

    def _canary_batches(self):
        """Every member canary once per batch (deterministic: no shuffling, no RNG)."""
        probe = self.probe
        batch = pad_collate(probe.members.full_ids, probe.pad_token_id)
        return [batch] * self.isolation.saliency_batches

    def _batch_nll(self, model, batch) -> torch.Tensor:
        device = self.device
        batch = {k: v.to(device) for k, v in batch.items()}
        nll, tokens = self._nll_sum(batch)
        return nll / tokens

    def _isolate(self) -> None:
        """Fix S, quantise the public weights, freeze the rest (same on every rank)."""
        with torch.random.fork_rng():  # drawing calibration batches must not shift training RNG
            support = build_isolation(self.model, self.isolation, self._public_batches,
                                      self._canary_batches, self._batch_nll)
        self.isolated_support = self.trainer.strategy.broadcast(support, src=0)
        self._activate_isolation(initial=True)
        cfg = self.isolation
        rank_zero_info(
            f"isolated SFT: support={cfg.support} (sees {SUPPORT_SEES[cfg.support]}), "
            f"rho={cfg.rho}, {len(self.isolated_support.masks)} layers, base {cfg.quant.method} "
            f"INT{cfg.quant.bits}/g{cfg.quant.group_size}, train_on_base={cfg.train_on_base}, "
            f"public_base_updates={cfg.public_base_updates}"
        )

    @property
    def public_base_updates(self) -> bool:
        """The canary phase also trains everything off S on public batches (α = 0 model)."""
        return (self.isolated_support is not None and self.isolation is not None
                and self.isolation.public_base_updates and not self._public_updates_done)

    def _maybe_freeze_public_base(self) -> None:
        """At `public_updates_fraction` of the canary phase: re-quantise the public-trained
        base, freeze it, and continue with S alone (quantisation-aware)."""
        if not (self.public_base_updates and self.in_canary_phase):
            return
        canary_steps = self.trainer.max_steps - self.hparams.public_steps
        switch = self.hparams.public_steps + math.ceil(self.isolation.public_updates_fraction * canary_steps)
        if self.global_step < switch:
            return
        self.isolated_support.freeze_base(self.model, self._requantised_public_bases())
        self._public_updates_done = True
        self._activate_isolation(initial=True)
        rank_zero_info(f"isolated SFT: base re-quantised after public updates and frozen at step "
                       f"{self.global_step}; the support alone trains from here")

    def _requantised_public_bases(self) -> dict:
        """Q of the α = 0 weights after public updates (calibration draws leave the RNG as it was)."""
        with torch.random.fork_rng():
            return self.isolated_support.public_bases(self.model, self.isolation, self._public_batches)

    def _activate_isolation(self, initial: bool) -> None:
        """Freeze/mask as the isolation mode wants. On resume (`initial=False`) with public
        base updates the off-S weights are trained values and are left as they are."""
        if self.public_base_updates:
            if self.trainer.world_size > 1 or self.trainer.accumulate_grad_batches > 1:
                raise ValueError("isolation.public_base_updates supports one process and "
                                 "accumulate_grad_batches=1 (it replaces gradients after backward)")
            if initial:
                apply_isolation(self.model, self.isolated_support, freeze_rest=False)
        else:
            apply_isolation(self.model, self.isolated_support)
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = [] if self.public_base_updates else self.isolated_support.mask_gradients(self.model)

    def _support_masks_by_param(self) -> dict[int, torch.Tensor]:
        return public_updates.support_masks_by_param(self.model, self.isolated_support)

    def on_after_backward(self) -> None:
        """Public base updates: off S and unsieved parameters take the α = 0 public gradient,
        S keeps the gradient of the whole batch."""
        if self._public_grads is not None:
            public_updates.merge_public_grads_(self.model, self._public_grads, self._support_masks_by_param())
            self._public_grads = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.public_base_updates and self.in_canary_phase and gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("isolation.public_base_updates clips by norm only")
            public_updates.clip_split_([p for p in self.model.parameters() if p.requires_grad],
                                       self._support_masks_by_param(), float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        ratio = self._public_lr_ratio()
        before = None
        if ratio != 1.0:  # the update off S at public_lr: scale it after AdamW's step
            before = {id(p): p.detach().clone() for p in self.model.parameters() if p.requires_grad}
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if before is not None:
            public_updates.scale_public_update_(self.model, before, ratio, self._support_masks_by_param())
        if self.isolated_support is not None and not self.public_base_updates:
            self.isolated_support.restore_off_support(self.model)  # undoes weight decay off S

    def _public_lr_ratio(self) -> float:
        if not (self.public_base_updates and self.in_canary_phase) or self.isolation.public_lr is None:
            return 1.0
        return self.isolation.public_lr / self.hparams.sft_lr

    def isolated_streams(self) -> tuple[dict, dict, float, bool] | None:
        """(supports, bases, ρ, bases_are_pre) of the isolated sieve at the current weights:
        the bases fixed at the switch, Q(W_pre), or with public base updates Q of the
        public-trained α = 0 weights (re-quantised once per step). None without isolation."""
        support = self.isolated_support
        if support is None:
            return None
        if not self.public_base_updates:
            return support.masks, support.bases, self.isolation.rho, not self._public_updates_done
        if self._final_bases is None or self._final_bases[0] != self.global_step:
            self._final_bases = (self.global_step, self._requantised_public_bases())
        return support.masks, self._final_bases[1], self.isolation.rho, False

    @rank_zero_only
    def _record_pre_canary_ppl(self) -> None:
        self.public_ppl_before_canaries = evaluate_memorisation(self.model, self.probe, include=("ppl",))["public_ppl"]
        rank_zero_info(f"public perplexity before canaries: {self.public_ppl_before_canaries:.3f}")

    @rank_zero_only
    def _save_hf_model(self, name: str) -> None:
        with atomic_directory(self.run_dir / name) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

    # ---------------------------------------------------------------- training
    def _nll_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = metrics.token_logprobs(logits, batch["labels"])
        return -(logp * mask).sum(), mask.sum()

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        if self.public_base_updates and self.in_canary_phase:
            public = batch["public"]
            self._public_grads = public_updates.alpha_zero_public_grads(
                self.model, self.isolated_support, lambda: self._batch_nll(self.model, public))
        nll, tokens = self._nll_sum(batch["public"])
        if self.in_canary_phase:
            canary_nll, canary_tokens = self._nll_sum(batch["canary"])
            self.log("train/canary_loss", canary_nll / canary_tokens, prog_bar=True)
            nll, tokens = nll + canary_nll, tokens + canary_tokens
        loss = nll / tokens
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}: "
                "lower the learning rate or check the data"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/phase", float(self.in_canary_phase))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, tokens = self._nll_sum(batch)
        self.val_nll.update(nll / tokens, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        # MeanMetric.compute() already reduced across ranks; sync_dist averages equal values.
        self.log_dict({"val/public_nll": nll, "val/public_ppl": torch.exp(nll)}, sync_dist=True)
        if self.hparams.eval_during_validation and self.in_canary_phase and not self.trainer.sanity_checking:
            self._log_memorisation()

    def _log_memorisation(self) -> None:
        if self.trainer.is_global_zero:
            found = evaluate_memorisation(
                self.model, self.probe, exposure_references=self.hparams.val_exposure_references,
                include=("extraction", "exposure", "mia"),
            )
            for logger in self.loggers:
                logger.log_metrics({f"val/{k}": v for k, v in found.items()}, step=self.global_step)

    # ------------------------------------------------------------------ ending
    def on_train_end(self) -> None:
        self._save_hf_model("hf_model")
        self._write_summary()

    @rank_zero_only
    def _write_summary(self) -> None:
        rank_zero_info("final memorisation evaluation (all reference secrets)…")
        found = evaluate_memorisation(self.model, self.probe, progress=True)
        found["public_ppl_before_canaries"] = self.public_ppl_before_canaries
        found["canary_steps"] = self.trainer.max_steps - self.hparams.public_steps
        if self.isolated_support is not None:
            cfg = self.isolation
            found["isolation"] = {
                "support": cfg.support, "support_sees": SUPPORT_SEES[cfg.support], "rho": cfg.rho,
                "density": self.isolated_support.density,
                # with public base updates the weights off S train on public text by design
                "off_support_max_drift": (None if self.public_base_updates
                                          else self.isolated_support.off_support_drift(self.model)),
                "base": f"int{cfg.quant.bits}_{cfg.quant.method}", "train_on_base": cfg.train_on_base,
                "public_base_updates": cfg.public_base_updates,
                "public_updates_fraction": cfg.public_updates_fraction if cfg.public_base_updates else None,
            }
        found["canary_presentations_per_member"] = (
            found["canary_steps"] * self.trainer.datamodule.hparams.canary_batch_size
            * max(1, self.trainer.world_size) / len(self.probe.members)
        )
        self.final_metrics = found
        for logger in self.loggers:
            logger.log_metrics({f"final/{k}": v for k, v in found.items() if isinstance(v, (int, float))},
                               step=self.global_step)
            logger.save()
        summary = {key: found.get(key) for key in SUMMARY_KEYS} | {
            k: v for k, v in found.items() if k not in SUMMARY_KEYS
        }
        path = write_json_atomic(self.run_dir / "summary.json", summary)
        rank_zero_info(f"summary written to {path.resolve()}")
        # plot data for the report: ROC rates and reference log-perplexity counts, no secrets
        roc = mia_roc_curves(self.model, self.probe)
        if roc:
            write_json_atomic(self.run_dir / "roc.json", roc)
        write_json_atomic(self.run_dir / "exposure_refs.json", exposure_reference_histogram(self.model, self.probe))

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        total = self.trainer.max_steps
        sft_scale = hp.sft_lr / hp.lr

        def factor(step: int) -> float:
            if step < hp.public_steps:
                return warmup_cosine(step, hp.warmup_steps, hp.public_steps, hp.min_lr_ratio)
            return sft_scale * warmup_cosine(
                step - hp.public_steps, hp.sft_warmup_steps, total - hp.public_steps, hp.min_lr_ratio
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["public_ppl_before_canaries"] = self.public_ppl_before_canaries
        if self.isolated_support is not None:
            checkpoint["isolated_support"] = self.isolated_support.state()
            checkpoint["public_updates_done"] = self._public_updates_done
            checkpoint["pre_canary_state_dict"] = self.pre_canary_state_dict

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.public_ppl_before_canaries = checkpoint.get("public_ppl_before_canaries")
        if "isolated_support" in checkpoint:
            self.isolated_support = IsolatedSupport.from_state(checkpoint["isolated_support"])
            self._public_updates_done = checkpoint.get("public_updates_done", False)
            self.pre_canary_state_dict = checkpoint.get("pre_canary_state_dict")
            self._activate_isolation(initial=False)
