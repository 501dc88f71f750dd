"""`UnlearnModule`: remove planted canaries from a fine-tuned model (docs/methods.md §9; quantisation-robust LoRA unlearning, MANSU).

The model comes from a Hugging Face directory (the quickstart's `hf_model` by default); the
data module must run with `train_split: unlearn`, so each step sees a forget batch (answer
tokens labelled) and a retain batch (public windows, plus the members not forgotten). The
loss is one of `ortho_train.unlearning.LOSSES`; a frozen copy of the starting model scores the
batches whose loss term needs a reference (NPO, KLR). Which parameters train and what happens
around each step is the update mode's (`ortho_train.unlearning.modes.UPDATE_MODES`), an
`ortho_train.update_control.UpdateControl` the module delegates to through the same calls as
canary SFT (`UpdateControlHooks`). `mode` names a registered mode (the settings of `lora` and
`mansu` in the arguments of the same name) or is one built with its settings in a config
(`mode: {class_path: …, init_args: {settings: …}}`), so a new mode needs nothing here:

- `lora`: peft LoRA adapters on `lora.target_modules`, base frozen (quantisation-robust LoRA unlearning);
- `full`: every parameter trains;
- `mansu`: only the weight rows of the forget-specific components train, and every applied
  update is projected off the retain-gradient span, bounded by the diagonal Fisher and floored
  at one quantisation bin per weight (MANSU; `ortho_train.unlearning.mansu_mode`).

Divergence guard: a non-finite loss, or a retain (public validation) perplexity above
`max_retain_ppl_factor` × its value at the start (checked every `guard_every_n_steps`), stops
training, restores the last weights that passed the check and records why in `divergence`; the
run then ends with `UnlearningStopped` (non-zero exit) after its artifacts are written, and the
metrics card says `status: stopped`.

Public attributes read by the callbacks: `model`, `tokenizer`, `mode` (the mode's name), `update_mode`, `forget_probe`,
`retain_members`, `original_weights`, `method_card`, `divergence`, `final_report`, `run_dir`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ortho_train.distributed import broadcast_from_zero, refuse_sharded_strategy
from ortho_train.models import DtypeName, count_parameters, load_causal_lm, model_dtype
from ortho_train.provenance import check_same_canaries
from ortho_train.quantisation import effective_linear_weights
from ortho_train.rng_state import GlobalRNG
from ortho_train.run_paths import resolve_latest
from ortho_train.settings import check_settings, choice_rule, is_finite
from ortho_train.tokenization import load_tokenizer
from ortho_train.unlearning import attribution
from ortho_train.unlearning.common import sequence_nll
from ortho_train.unlearning.lora import ALL_LINEAR, LLAMA_LINEARS, LoraAdapterConfig  # noqa: F401 (re-exported)
from ortho_train.unlearning.mansu import MansuConfig
from ortho_train.unlearning.modes import build_update_mode
from ortho_train.unlearning.update_mode import UpdateMode
from ortho_train.update_control import UpdateControl, UpdateControlHooks
from ortho_train.unlearning.objective import LOSSES, UnlearningObjective
from ortho_train.unlearning.run_data import attribution_data, forget_nll, retain_batch, retain_ppl
from ortho_train.unlearning.optimizers import OPTIMIZERS, OptimizerName  # noqa: F401 (OPTIMIZERS re-exported)



class UnlearningStopped(RuntimeError):
    """The divergence guard ended training: the run is reported as stopped, not as a success."""


class UnlearningChangedNothing(RuntimeError):
    """The run ended with the forget set's likelihood where it started: reported as `no_change`,
    never as a success (e.g. `lora.alpha: 0` scales every adapter update to nothing)."""


# A forget canary's sequence NLL that moved less than this (nats) did not move: float rounding of an
# unchanged model stays orders of magnitude below it, one optimiser step that changes the model does not.
NO_CHANGE_NATS = 1e-6


class UnlearnModule(UpdateControlHooks, L.LightningModule):
    """Unlearning of the forget canaries by LoRA, full-parameter or MANSU updates.

    Args:
        model_path: fine-tuned Hugging Face model directory (with its tokenizer);
            `runs/<name>/latest/hf_model` takes the newest run of `<name>`.
        mode: a registered update mode ('lora', 'full', 'mansu'; `UPDATE_MODES`), or one built with
            its settings (`class_path` / `init_args: {settings: …}` in a config).
        loss: 'ga', 'gdr', 'klr', 'npo', 'npo_gdr' or 'npo_klr'.
        beta: NPO inverse temperature.
        retain_weight: λ of the retain term (GDR/KLR).
        lr: peak learning rate.
        optimizer: 'adamw' or 'sgd'.
        weight_decay: AdamW decoupled weight decay on the trained matrices.
        warmup_steps: linear learning-rate warm-up (constant afterwards).
        lora: adapter settings of mode 'lora' given by name.
        mansu: MANSU settings of mode 'mansu' given by name.
        max_retain_ppl_factor: stop when retain perplexity exceeds this × its start (None: off).
        guard_every_n_steps: how often the retain perplexity is checked (and a good state kept; 0: never).
        guard_windows: held-out public windows used for that check and the start's retain perplexity (≥ 1).
        attribution_batches: forget/retain batches for the attribution scores behind CAD (0: no CAD).
        dtype: dtype the model is loaded in: 'float32' (default), 'bfloat16' or 'float16'. LoRA
            (peft keeps the adapters in float32) takes all three, full unlearning float32 and
            bfloat16 (float16 under AdamW without loss scaling gives NaN); MANSU needs float32.
            Refused combinations fail at start-up. PTQ copies are float32; metrics take float32
            log-probs of the logits.
    """

    def __init__(
        self,
        model_path: str = "runs/quickstart/latest/hf_model",
        mode: str | UpdateMode = "lora",
        loss: str = "npo_gdr",
        beta: float = 0.1,
        retain_weight: float = 1.0,
        lr: float = 1e-3,
        optimizer: OptimizerName = "adamw",
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lora: LoraAdapterConfig | None = None,
        mansu: MansuConfig | None = None,
        max_retain_ppl_factor: float | None = 1.5,
        guard_every_n_steps: int = 10,
        guard_windows: int = 16,
        attribution_batches: int = 4,
        dtype: DtypeName = "float32",
    ):
        super().__init__()
        self.save_hyperparameters()
        self._check_settings(self.hparams)
        self.objective = UnlearningObjective(loss, beta, retain_weight)
        # the arguments themselves: under LightningCLI `hparams` holds the config's dicts, not the objects
        self.update_mode = build_update_mode(mode, {"lora": lora, "mansu": mansu})  # `UPDATE_MODES` checks `mode`
        self.mode = self.update_mode.name
        torch_dtype = model_dtype(dtype, "model.init_args.dtype")
        self.update_mode.check_settings(weight_decay, torch_dtype)
        # `runs/<name>/latest/…`: the newest run; absolute, so the exported adapter's
        # `base_model_name_or_path` loads from anywhere (a relative one reads as a hub id elsewhere)
        self.model_path = str(resolve_latest(model_path).resolve())
        self._load(torch_dtype)
        self.divergence: str | None = None
        self.final_report: dict = {}
        self.forget_probe = None
        self.retain_members = None
        self._run_dir: Path | None = None
        self._good_state: dict[str, torch.Tensor] = {}
        self._good_step = 0
        self._start_retain_ppl: float | None = None
        self._start_forget_nll: torch.Tensor | None = None
        self.no_change: str | None = None
        self._attribution_before: dict | None = None
        self._resumed = False  # the start-of-run state came from a checkpoint
        self.global_rng = GlobalRNG()

    @staticmethod
    def _check_settings(hp) -> None:
        """Refuse, before the model is loaded, a setting that would fail later or do nothing."""
        ppl_factor = hp.max_retain_ppl_factor
        check_settings("model.init_args", [
            ("lr", hp.lr, is_finite(hp.lr) and hp.lr > 0, "learning rates must be > 0"),
            choice_rule("loss", hp.loss, LOSSES),
            choice_rule("optimizer", hp.optimizer, OptimizerName), choice_rule("dtype", hp.dtype, DtypeName),
            ("max_retain_ppl_factor", ppl_factor, ppl_factor is None or ppl_factor > 1,
             "must be > 1 (or null: no divergence guard)"),
            ("weight_decay", hp.weight_decay, is_finite(hp.weight_decay) and hp.weight_decay >= 0, "must be ≥ 0"),
            ("warmup_steps", hp.warmup_steps, hp.warmup_steps >= 0, "must be ≥ 0"),
            ("guard_every_n_steps", hp.guard_every_n_steps, hp.guard_every_n_steps >= 0, "must be ≥ 0 (0: never)"),
            ("guard_windows", hp.guard_windows, hp.guard_windows >= 1,
             "must be ≥ 1 (held-out windows of the retain-perplexity check)"),
            ("attribution_batches", hp.attribution_batches, hp.attribution_batches >= 0, "must be ≥ 0 (0: no CAD)"),
        ])

    def _load(self, torch_dtype: torch.dtype) -> None:
        """The model to unlearn (prepared by the update mode), its tokenizer, its starting linear
        weights, and the frozen reference when the loss needs one."""
        model = load_causal_lm(self.model_path, torch_dtype).train()  # clear error for a missing directory
        self.update_mode.check_model(model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.original_weights = effective_linear_weights(model)
        self.linear_names = list(self.original_weights)
        # The frozen reference stays out of the module tree (object.__setattr__ bypasses nn.Module's
        # registration): not trained, not checkpointed, not switched to train mode by Lightning.
        reference = copy.deepcopy(model).eval().requires_grad_(False) if self.objective.needs_reference else None
        object.__setattr__(self, "_reference", reference)
        self.model = self.update_mode.prepare(model)
        self.update_mode.setup(self)

    @property
    def update_control(self) -> UpdateControl:
        """The update mode, under the name both modules delegate to (`UpdateControlHooks`)."""
        return self.update_mode

    def info(self, message: str) -> None:
        rank_zero_info(message)

    # ------------------------------------------------------------------ setup
    @property
    def mansu_plan(self):
        """The MANSU plan of a `mansu` run (None otherwise)."""
        return getattr(self.update_mode, "plan", None)

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            raise RuntimeError("run_dir is known once fit has started")
        return self._run_dir

    @property
    def method_card(self) -> dict:
        """What was run: method, loss, hyper-parameters (for the metrics card)."""
        hp = self.hparams
        card = {"mode": self.mode, "loss": hp.loss, "beta": hp.beta, "retain_weight": hp.retain_weight,
                "lr": hp.lr, "optimizer": hp.optimizer, "weight_decay": hp.weight_decay,
                "model_path": self.model_path, "trainable_parameters": self.trainable_parameter_count}
        return card | self.update_mode.summary_entries()

    @property
    def trainable_parameter_count(self) -> int:
        return self.update_mode.trainable_count()

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "forget_probe"):
            raise ValueError("UnlearnModule needs a CanaryDataModule (trainer.datamodule)")
        if datamodule.hparams.train_split != "unlearn":
            raise ValueError("UnlearnModule needs the data module with train_split='unlearn' "
                             "(forget/retain batches); set data.train_split: unlearn")
        if len(datamodule.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            raise ValueError("the data tokenizer is larger than the model's embedding: use the model's tokenizer")
        check_same_canaries(self.model_path, datamodule.canary_record)
        refuse_sharded_strategy(self.trainer, "UnlearnModule")
        self.forget_probe = datamodule.forget_probe
        self.retain_members = datamodule.retain_members

    def _retain_ppl(self) -> float:
        return retain_ppl(self.model, self.forget_probe, self.hparams.guard_windows)

    def _forget_nll(self) -> torch.Tensor:
        return forget_nll(self.model, self.trainer.datamodule, self.device)

    def _attribution_data(self):
        """The forget batches; enough public batches for the attribution and the mode's start
        (MANSU's retain gradients), then the retain canaries."""
        dm = self.trainer.datamodule
        wanted = max(self.hparams.attribution_batches, 1, self.update_mode.retain_batches_wanted(dm.hparams.batch_size))
        return attribution_data(dm, wanted)

    def on_fit_start(self) -> None:
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self._reference is not None:
            self._reference.to(self.device)
        if not self._resumed:  # a resumed run keeps the start measured on the starting weights
            self._measure_start()
        rank_zero_info(f"UnlearnModule[{self.mode}, {self.hparams.loss}]: {count_parameters(self.model) / 1e6:.2f}M "
                       f"parameters, {self.trainable_parameter_count} trainable; retain ppl at start "
                       f"{self._start_retain_ppl:.3f}")

    def _measure_start(self) -> None:
        """Retain perplexity, CAD's attribution baseline and what the update mode measures (the
        MANSU plan) on the starting model."""
        self._start_retain_ppl = self._retain_ppl()
        self._start_forget_nll = self._forget_nll()
        if self.hparams.attribution_batches > 0 or self.update_mode.needs_start_attribution:
            forget, retain = self._attribution_data()
            self._attribution_before = attribution.unit_attribution(self.model, forget, sequence_nll, self.linear_names)
            self.update_mode.start(forget, retain, self._attribution_before, self.linear_names,
                                   lambda obj: broadcast_from_zero(self.trainer.strategy, obj))
        self._keep_good_state()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What the start of the run measured (the guard's start perplexity and last good
        weights, CAD's baseline, the MANSU plan) and the global generators: a resumed run
        continues with them instead of measuring its resumed weights."""
        checkpoint["unlearn"] = {
            "start_retain_ppl": self._start_retain_ppl, "start_forget_nll": self._start_forget_nll,
            "good_state": self._good_state, "good_step": self._good_step,
            "attribution_before": self._attribution_before, "divergence": self.divergence,
            "update_mode": self.update_mode.state_dict(),
        }
        self.global_rng.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("unlearn")
        if state is None:
            raise ValueError("the checkpoint holds no unlearning state (not written by UnlearnModule): "
                             "resume with a checkpoint of the same unlearning run")
        self._start_retain_ppl, self._good_state = state["start_retain_ppl"], state["good_state"]
        self._start_forget_nll = state.get("start_forget_nll")  # None in checkpoints of earlier versions
        self._good_step, self._attribution_before = state["good_step"], state["attribution_before"]
        self.divergence = state["divergence"]
        self.update_mode.load_state_dict(state["update_mode"])
        self.global_rng.load(checkpoint)
        self._resumed = True

    def on_train_start(self) -> None:
        self.global_rng.apply_pending()  # resumed: the generators as at the checkpoint, before any batch is fetched

    # --------------------------------------------------------------- training
    def _logits(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch, batch_idx: int):
        parts = self.update_mode.training_loss(batch)
        loss = parts["loss"]
        # under DDP every rank must skip the step together (one skipping backward alone would hang)
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            self._stop(f"non-finite loss ({loss.item()}) at step {self.global_step}")
            return None  # Lightning skips backward and the optimiser step
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, prog_bar=True)
        return loss

    def unlearning_loss(self, batch) -> dict[str, torch.Tensor]:
        """The objective's parts on a forget/retain batch (`UnlearningObjective`), the reference
        model scoring exactly the batches whose term asks for it."""
        objective, forget = self.objective, batch["forget"]
        forget_logits = self._logits(self.model, forget)
        ref_forget = ref_retain = retain = retain_logits = None
        if objective.retain is not None:
            retain = retain_batch(batch)
            retain_logits = self._logits(self.model, retain)
        with torch.no_grad():
            if objective.forget.needs_reference:
                ref_forget = self._logits(self._reference, forget)
            if objective.retain is not None and objective.retain.needs_reference:
                ref_retain = self._logits(self._reference, retain)
        return objective(forget_logits, forget["labels"], ref_forget, retain_logits,
                         retain["labels"] if retain is not None else None, ref_retain)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.divergence is not None:
            return
        every = self.hparams.guard_every_n_steps
        if every > 0 and self.global_step % every == 0:
            self._check_retain()

    def _check_retain(self) -> None:
        ppl = self._retain_ppl()
        self.log("guard/retain_ppl", ppl)
        factor = self.hparams.max_retain_ppl_factor
        if not torch.isfinite(torch.tensor(ppl)) or (factor is not None and ppl > factor * self._start_retain_ppl):
            self._stop(f"retain perplexity {ppl:.3f} exceeds {factor} × its start ({self._start_retain_ppl:.3f}) "
                       f"at step {self.global_step}")
        else:
            self._keep_good_state()

    def _trainable(self) -> dict[str, nn.Parameter]:
        return self.update_mode.trainable_parameters()

    def _keep_good_state(self) -> None:
        self._good_state = {n: p.detach().to("cpu", copy=True) for n, p in self._trainable().items()}
        self._good_step = self.global_step

    @torch.no_grad()
    def _stop(self, reason: str) -> None:
        for name, param in self._trainable().items():
            param.copy_(self._good_state[name].to(param.device))
        self.divergence = f"{reason}; restored the weights of step {self._good_step}"
        self.trainer.should_stop = True
        rank_zero_warn(f"UnlearnModule divergence guard stopped training: {self.divergence}")

    def on_train_end(self) -> None:
        report = {"retain_ppl_start": self._start_retain_ppl, "retain_ppl_end": self._retain_ppl(),
                  "steps": self.global_step, "divergence": self.divergence}
        if self._start_forget_nll is not None:
            moved = (self._forget_nll() - self._start_forget_nll).abs().max().item()
            report["forget_nll_max_change"] = moved
            if moved < NO_CHANGE_NATS and self.divergence is None:
                self.no_change = (f"no forget canary's NLL moved by {NO_CHANGE_NATS:g} nats or more in "
                                  f"{self.global_step} steps (at most {moved:.2e}): the update changed nothing")
        after = None
        if self._attribution_before is not None:
            forget, _ = self._attribution_data()
            after = attribution.unit_attribution(self.model, forget, sequence_nll, self.linear_names)
            report["cad"] = attribution.attribution_divergence(self._attribution_before, after)
        self.final_report = report | self.update_mode.report(self._attribution_before, after)
        rank_zero_info(f"UnlearnModule final: { {k: v for k, v in report.items() if k != 'mansu'} }")

    def on_fit_end(self) -> None:
        # After the callbacks' `on_fit_end` (the card says "stopped"): a stopped run exits non-zero.
        if self.divergence is not None:
            raise UnlearningStopped(f"unlearning did not finish: {self.divergence}")
        if self.no_change is not None:
            raise UnlearningChangedNothing(f"unlearning changed nothing: {self.no_change}")

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = OPTIMIZERS.get(hp.optimizer)(list(self._trainable().values()), hp)
        warmup = max(hp.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
