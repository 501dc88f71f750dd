"""`CanarySFTModule`: plant memorisation by canary SFT, measure it, save the models.

Two phases within one `fit`, split at `public_steps`:
1. public warm-up: causal-LM training on public windows only. At its end the weights are the
   "public" (pre-canary) model: kept in memory (`pre_canary_state_dict`), saved in Hugging Face
   format to `<run>/hf_model_pre_canary`, and their public perplexity recorded.
2. canary SFT: every step adds `canary_batch_size` member canaries to the public batch (its
   first `canary_phase_public_windows` windows, when set); the loss is the token-weighted mean
   NLL over both. The optimiser state is reset at the switch
   and the learning rate follows its own warm-up + cosine schedule (`sft_lr`).

Training ends at `trainer.max_steps` (the single source of truth for the run length). At the
end the fine-tuned model goes to `<run>/hf_model` and the memorisation metrics to
`<run>/summary.json` (docs/methods.md §2), on rank zero only, with the plot data of the report
beside it: `roc.json` (MIA ROC rates) and `exposure_refs.json` (histogram of the reference
secrets' log-perplexities, its skew-normal fit, the members' log-perplexities). A run stopped
early (a stop signal, a full disk: `ortho_train.interruption`) saves `hf_model` as it stands and a
`summary.json` marked `status: interrupted`, without the evaluation (`save_interrupted`).

The canary phase's update is governed by a private-update controller
(`ortho_train.private_update`), picked from the config: none set is dense SFT; `isolation:`
restricts it to a sparse support S fixed at the switch (`IsolationController`); `ogd:` projects
it off a protected K-FAC subspace of the public model (`OGDController`); `dp:` beside
`isolation:` makes the support's canary update DP-SGD (`DPIsolationController`). The module's
hooks only delegate to `private_update`, an `ortho_train.update_control.UpdateControl` reached
through the same calls as unlearning's update modes (`UpdateControlHooks`); `private_streams()`
hands the sieve callback its typed stream view. Start-up checks live in `ortho_train.sft_settings`. `setup` prepares DDP before it wraps the model (`ortho_train.distributed`).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchmetrics import MeanMetric

from ortho_train import metrics
from ortho_train.artifacts import atomic_directory
from ortho_train.distributed import allow_parameters_frozen_later, refuse_sharded_strategy
from ortho_train.evaluation import evaluate_memorisation
from ortho_train.model_support import refuse_float16_training
from ortho_train.models import (DtypeName, TinyLlamaConfig, build_tiny_llama, count_parameters, load_causal_lm,
                                model_dtype, weight_bytes)
from ortho_train.ogd import OGDConfig
from ortho_train.private_update import PrivateStreams, build_controller
from ortho_train.privacy import DPConfig
from ortho_train.rng_state import GlobalRNG
from ortho_train.run_summary import write_interrupted_summary, write_run_summary
from ortho_train.schedules import warmup_cosine
from ortho_train.separation.displacement import Displacements
from ortho_train.sft_settings import MODEL, check_phase_lengths, check_sft_settings
from ortho_train.sieve.isolation import IsolationConfig
from ortho_train.tokenization import BYTE_TOKENIZER, load_tokenizer
from ortho_train.update_control import UpdateControl, UpdateControlHooks


class CanarySFTModule(UpdateControlHooks, L.LightningModule):
    """Causal-LM training on public text, then on public text + secret canaries.

    Args:
        model_path: local Hugging Face causal-LM directory; None builds a tiny Llama from
            `tiny_llama` with the byte tokenizer.
        tiny_llama: size of the Llama built when `model_path` is None.
        public_steps: public-only warm-up steps before canaries are mixed in (0: none).
        canary_phase_public_windows: public windows per canary-phase step: the first k of each
            public batch of `data.batch_size` (None: all of them). Fewer windows make a canary
            step cheaper and give the canaries a larger share of its token-mean loss.
        lr: peak learning rate of the public phase (AdamW).
        sft_lr: peak learning rate of the canary phase.
        warmup_steps: linear warm-up steps of the public phase (at most `public_steps`).
        sft_warmup_steps: linear warm-up steps of the canary phase.
        min_lr_ratio: cosine floor as a fraction of the peak, in [0, 1].
        weight_decay: AdamW decoupled weight decay (not applied to norms/biases), ≥ 0.
        betas: AdamW betas, each in [0, 1).
        val_exposure_references: reference secrets used for exposure at validation (cheap);
            the final evaluation uses all of the data module's references.
        eval_during_validation: compute memorisation metrics at each validation in the canary phase.
        model_seed: seeds the initialisation of a model built from a config.
        isolation: restrict the canary phase to a sparse support fixed at the switch (None:
            dense SFT). See `ortho_train.sieve.isolation.IsolationConfig`.
        ogd: keep the canary update out of a protected K-FAC subspace S_gen of the public
            model, tracked apart from the public update (None: dense SFT; not together with
            isolation). See `ortho_train.ogd.OGDConfig`.
        dp: DP-SGD on the isolation support (or, with `scope: global`, on every trainable
            weight), privacy unit one member canary; needs `isolation` with
            `public_base_updates: true`. See `ortho_train.privacy.DPConfig`.
        track_displacements: track the public and private displacements ΔW_pub, ΔW_priv of
            the canary phase (for η in the separation table). Dense SFT then runs one extra
            backward through the canary half per step; OGD tracks them anyway; isolation
            refuses it. See `ortho_train.separation.displacement`.
        dtype: dtype of the model's weights: 'float32' (default) or 'bfloat16'
            (`from_pretrained(dtype=...)` for `model_path`, a cast for the built Llama). Dense
            SFT trains in it (AdamW states too, no float32 master copy: a step below a weight's
            bfloat16 spacing, 2⁻⁸ of its size, rounds away); isolation, OGD and DP need float32
            and refuse another at start-up; 'float16' is refused (AdamW without loss scaling
            gives NaN). Metrics take float32 log-probs of the logits.
    """

    def __init__(
        self,
        model_path: str | None = None,
        tiny_llama: TinyLlamaConfig | None = None,
        public_steps: int = 600,
        canary_phase_public_windows: int | None = None,
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
        ogd: OGDConfig | None = None,
        dp: DPConfig | None = None,
        track_displacements: bool = False,
        dtype: DtypeName = "float32",
    ):
        super().__init__()
        self.save_hyperparameters()
        check_sft_settings(self.hparams)
        torch_dtype = model_dtype(dtype, f"{MODEL}.dtype")  # a Literal: checked by settings.check_choices
        refuse_float16_training(torch_dtype, "CanarySFTModule")
        self.tokenizer = load_tokenizer(model_path or BYTE_TOKENIZER)
        if model_path is None:
            self.model = build_tiny_llama(
                tiny_llama or TinyLlamaConfig(), len(self.tokenizer),
                self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, seed=model_seed,
            ).to(torch_dtype)
        else:
            self.model = load_causal_lm(model_path, torch_dtype).train()  # from_pretrained returns eval mode
        self.val_nll = MeanMetric()
        self.pre_canary_state_dict: dict[str, torch.Tensor] | None = None
        self.public_ppl_before_canaries: float | None = None
        self.final_metrics: dict[str, float] | None = None
        self.isolation, self.ogd, self.dp = isolation, ogd, dp
        self.private_update = build_controller(isolation=isolation, ogd=ogd, dp=dp)
        if track_displacements:
            self.private_update.track_displacements()
        self.private_update.setup(self)
        self._run_dir: Path | None = None
        self.global_rng = GlobalRNG()

    @property
    def update_control(self) -> UpdateControl:
        """The private-update controller, under the name both modules delegate to (`UpdateControlHooks`)."""
        return self.private_update

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
        self._check_strategy()

    def _check_strategy(self) -> None:
        """Before the strategy wraps the model: one device or DDP (sharding refused), the
        controller's limits on processes, and DDP told when parameters freeze mid-fit."""
        trainer = self.trainer
        refuse_sharded_strategy(trainer, "CanarySFTModule")
        self.private_update.check_processes(trainer.world_size)
        if self.private_update.freezes_parameters:
            allow_parameters_frozen_later(trainer, f"model.{self.private_update.name}")

    def on_fit_start(self) -> None:
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        total = self.trainer.max_steps
        check_phase_lengths(self.hparams, total, self.trainer.datamodule.hparams.batch_size)
        rank_zero_info(f"CanarySFTModule: {count_parameters(self.model) / 1e6:.2f}M parameters; "
                       f"{self.hparams.public_steps} public steps then {total - self.hparams.public_steps} canary steps")
        self.private_update.fit_start()

    def on_train_start(self) -> None:
        self.global_rng.apply_pending()  # resumed: the generators as at the checkpoint, before any batch is fetched

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == self.hparams.public_steps and self.pre_canary_state_dict is None:
            self._enter_canary_phase()
        self.private_update.before_batch(self.global_step)

    def _enter_canary_phase(self) -> None:
        """Snapshot the public model, save it, measure its perplexity, reset the optimiser."""
        self.pre_canary_state_dict = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()  # SFT starts with fresh moments, as a separate fine-tune would
        self._save_hf_model("hf_model_pre_canary")
        self._record_pre_canary_ppl()
        self.private_update.enter_canary_phase()

    def info(self, message: str) -> None:
        rank_zero_info(message)

    def private_streams(self) -> PrivateStreams | None:
        """The private fine-tune's streams at the current weights (None for dense SFT)."""
        return self.private_update.streams()

    def displacements(self) -> Displacements | None:
        """ΔW_pub and ΔW_priv of the canary phase so far (None: not tracked)."""
        return self.private_update.displacements()

    @rank_zero_only
    def _record_pre_canary_ppl(self) -> None:
        self.public_ppl_before_canaries = evaluate_memorisation(self.model, self.probe, include=("ppl",))["public_ppl"]
        rank_zero_info(f"public perplexity before canaries: {self.public_ppl_before_canaries:.3f}")

    @rank_zero_only
    def _save_hf_model(self, name: str) -> None:
        with atomic_directory(self.run_dir / name, needed=weight_bytes(self.model)) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

    # ---------------------------------------------------------------- training
    def nll_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, number of label tokens) of a batch already on the model's device.

        ``NLL = −Σ_{b,t} mask · log p(labels[b, t+1] | ids[b, ≤t])``; at a large vocabulary the LM
        head runs a chunk of positions at a time, recomputed in the backward, so neither the
        (B, T, V) logits nor their gradient is held whole (`metrics.scoring.label_logprobs`).
        """
        logp, mask = metrics.label_logprobs(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        return -(logp * mask).sum(), mask.sum()

    def batch_nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean NLL per label token of a batch (moved to the model's device)."""
        nll, tokens = self.nll_sum({k: v.to(self.device) for k, v in batch.items()})
        return nll / tokens

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        if self.in_canary_phase:
            parts = self.private_update.training_loss(self._canary_phase_batch(batch))
            self.log("train/canary_loss", parts.canary, prog_bar=True)
            for name, value in parts.extra.items():
                self.log(f"train/{name}", value)
            loss, logged = parts.loss, parts.logged
        else:
            nll, tokens = self.nll_sum(batch["public"])
            loss = logged = nll / tokens
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}: "
                "lower the learning rate or check the data"
            )
        self.log("train/loss", logged, prog_bar=True)
        self.log("train/phase", float(self.in_canary_phase))
        return loss

    def _canary_phase_batch(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """The batch with its public part cut to `canary_phase_public_windows` windows (if set)."""
        windows = self.hparams.canary_phase_public_windows
        if windows is None:
            return batch
        public = {key: value[:windows] for key, value in batch["public"].items()}  # (B, T) -> (k, T)
        return {**batch, "public": public}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, tokens = self.nll_sum(batch)
        self.val_nll.update(nll / tokens, weight=tokens)

    def on_train_epoch_end(self) -> None:
        self._log_private_progress()

    def _log_private_progress(self) -> None:
        """The controller's running numbers (e.g. ε spent so far), at epoch ends and validations."""
        found = self.private_update.progress()
        if found:
            self.log_dict(found, sync_dist=False, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._log_private_progress()
        nll = self.val_nll.compute()
        self.val_nll.reset()
        # MeanMetric.compute() already reduced across ranks; sync_dist averages equal values.
        self.log_dict({"val/public_nll": nll, "val/public_ppl": torch.exp(nll)}, sync_dist=True)
        if self.hparams.eval_during_validation and self.in_canary_phase and not self.trainer.sanity_checking:
            self._log_memorisation()

    def _log_memorisation(self) -> None:
        if self.global_step >= self.trainer.max_steps:
            return  # the final evaluation follows at once, with every reference secret
        if self.trainer.is_global_zero:
            found = evaluate_memorisation(
                self.model, self.probe, exposure_references=self.hparams.val_exposure_references,
                include=("extraction", "exposure", "mia"),
            )
            for logger in self.loggers:
                logger.log_metrics({f"val/{k}": v for k, v in found.items() if isinstance(v, (int, float))},
                                   step=self.global_step)

    # ------------------------------------------------------------------ ending
    def on_train_end(self) -> None:
        self._save_hf_model("hf_model")
        self._write_summary()

    @rank_zero_only
    def _write_summary(self) -> None:
        self.final_metrics = write_run_summary(self)

    def save_interrupted(self, record: dict) -> None:
        """A run stopped before its end (`ortho_train.interruption`): `hf_model` as it stands and
        `summary.json` holding `record` (status, reason, step, checkpoint, resume command) and the
        canary record; no evaluation, which could outlast the time a stop signal leaves."""
        self._save_hf_model("hf_model")
        self._write_interrupted_summary(record)

    @rank_zero_only
    def _write_interrupted_summary(self, record: dict) -> None:
        write_interrupted_summary(self, record)

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        """AdamW over the controller's `trainable_parameters()` (every floating-point parameter:
        those it freezes included, so a resumed run's optimiser state loads), decay on matrices
        only, and the two-phase schedule."""
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.private_update.trainable_parameters().values():
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
        """Everything a resumed run needs beyond weights, optimiser and loop state: the public
        model and its perplexity (the pre_sft / delta rows, summary.json), the controller's
        state and the global generators."""
        checkpoint["public_ppl_before_canaries"] = self.public_ppl_before_canaries
        checkpoint["pre_canary_state_dict"] = self.pre_canary_state_dict
        state = self.private_update.state_dict()
        if state:
            checkpoint["private_update"] = {"name": self.private_update.name, "state": state}
        self.global_rng.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.public_ppl_before_canaries = checkpoint.get("public_ppl_before_canaries")
        self.pre_canary_state_dict = checkpoint.get("pre_canary_state_dict")
        self.global_rng.load(checkpoint)
        saved = checkpoint.get("private_update")
        if saved is not None:
            if saved["name"] != self.private_update.name:
                raise ValueError(f"the checkpoint was trained with {saved['name']!r}, the config sets "
                                 f"{self.private_update.name!r}")
            self.private_update.load_state_dict(saved["state"])
