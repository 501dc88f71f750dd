"""`PTQGapCallback`: does the forgetting survive 4-bit post-training quantisation?

Every `every_n_steps` optimiser steps and at the end of training it quantises a *copy* of the
module's model in each requested format (any deployment format of
`ortho_train.quantisation.registry`: NF4/FP4 with bitsandbytes `Linear4bit`, INT4 RTN with the
project's group quantiser; `ortho_train.quantisation.quantised_copy`) and evaluates, on the full-precision model and on every
quantised copy, the forget metrics (extraction rate, exposure, MIA AUC forget vs holdout,
VerbMem ROUGE-L) and retain utility (public perplexity; extraction of members kept). For a
LoRA model each format is measured in two deployments: `<fmt>` = merge the adapter, then
quantise everything; `<fmt>_adapter` = quantised base + full-precision adapter.

PTQ gap = metric(quantised) − metric(full precision) (docs/methods.md §2): a positive extraction
gap means quantisation brought forgotten secrets back. The bin-crossing fraction is the share
of updated quantised-layer weights whose |ΔW| exceeds half the bin width of their block;
`dequantised_change_fraction_<fmt>` is the exact share whose quantised value changed.

Each periodic measurement is written to `ptq_gap_step<N>.json`; at fit end (after the module's
final report and the model export) `ptq_gap.json` goes to the log dir (atomically). Every
measurement (before training with `evaluate_before`, periodic, final) goes to TensorBoard one
run per measured model, `ptq_rows/<deployment>` (deployment, format, LoRA deployment as
hparams; scalars `ptq/<metric>` at the step), and the final one adds the report's PTQ-gap
figures (`ptq_final/figures/<i>`). With `fail_on_gap`, a forget extraction gap above
`max_extraction_gap` in any deployment fails the run: `PTQGapError` is raised from `on_fit_end`
once it is written.

With `attack_metrics`, the measurements before and at the end add, per deployment, the forget
canaries' extraction@k (`forget_extraction_at_k`) and offline RMIA forget vs holdout
(`forget_mia_auc_rmia`, its SE, `forget_mia_tpr_at_<f>_fpr_rmia`: `ortho_train.measurement.attacks`)
against `rmia_reference`. Wherever the MIA is measured, each deployment also stores the LOSS
attack's ROC rates forget vs holdout (`forget_mia_roc_loss_<deployment>`: `{fpr, tpr}`, rates only),
which the report draws side by side with the start model's (`_fp_before`).

Reads the module's public attributes: `model`, `model_path`, `forget_probe`, `retain_members`,
`original_weights`, `run_dir`.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ortho_train.artifacts import write_json_atomic
from ortho_train.distributed import broadcast_from_zero
from ortho_train.evaluation import UNLEARNING_METRICS, canary_scores, evaluate_unlearning
from ortho_train.measurement.attacks import AttackSettings, AttackSuite
from ortho_train.measurement.kill_switch import roc_rates
from ortho_train.metrics import privleak
from ortho_train.model_support import is_peft_model, linear_weight
from ortho_train.models import load_causal_lm
from ortho_train.progress_lines import phase
from ortho_train.quantisation import (
    PTQConfig,
    deployment_format,
    canonical_format,
    deployment_formats,
    effective_linear_weights,
    exact_fallback_layers,
    quantisable_linears,
    quantised_copy,
)
from ortho_train.quantisation.bins import bin_crossing_counts, dequantised_change_counts
from ortho_train.report.tensorboard import log_figures, log_table_rows
from ortho_train.report.unlearning import ptq_gap_figures

PRIVLEAK_AUC = "forget_mia_auc_mink_40_"  # MUSE's PrivLeak uses Min-40% (forget vs holdout)
GAP_METRICS = ("forget_extraction", "forget_extraction_at_k", "forget_mia_auc_rmia", "forget_symbol_accuracy",
               "forget_exposure", "forget_mia_auc_loss",
               "forget_mia_auc_mink", "forget_verbmem", "holdout_extraction", "retain_extraction", "public_ppl")


class PTQGapError(RuntimeError):
    """Forgetting did not survive quantisation (raised when `fail_on_gap` is set)."""


def gap_name(metric: str) -> str:
    """`forget_extraction` → `extraction` (the spelling of the `ptq_gap_<name>_<variant>` keys)."""
    return metric.removeprefix("forget_")


def _check_counts(**settings: tuple[int | None, int]) -> None:
    """Each setting `(value, least)`: None passes (where documented: all), else value ≥ least."""
    bad = [f"{name}={value} (must be ≥ {least})" for name, (value, least) in settings.items()
           if value is not None and value < least]
    if bad:
        raise ValueError(f"PTQGapCallback: {', '.join(bad)}")


class PTQGapCallback(L.Callback):
    """Measure the PTQ gap of forget and retain metrics during and after unlearning.

    Args:
        formats: registered deployment formats ('nf4', 'fp4', 'int4_rtn'; `registry.deployment_formats()`).
        quant: how the copies are quantised (`PTQConfig`: NF4/FP4 block size, double
            quantisation, compute dtype, INT4 group size, linears kept in full precision, the
            bitsandbytes CPU kernel).
        lora_deployments: for LoRA models, 'merged' and/or 'adapter'.
        every_n_steps: evaluate every n optimiser steps (0: only before and after training).
        periodic_metrics: what the periodic measurements compute, a subset of extraction,
            exposure, mia, verbmem, ppl (None: all). Each costs one pass per quantised copy:
            `[extraction]` keeps a periodic PTQ gap cheap enough to run often.
        evaluate_before: also measure the starting model (keys `*_before`).
        exposure_references: reference secrets for the rank exposure during training (None: all).
        final_exposure_references: reference secrets for the rank exposure before and at the end
            (None: all; after unlearning each costs a full scoring per forget canary).
        skewnorm_references: references the skew-normal exposure is fitted to (0: not computed,
            as in `evaluate_memorisation`; the rank exposure stays).
        max_extraction_gap: largest tolerated forget extraction gap (quantised − fp).
        fail_on_gap: raise `PTQGapError` at fit end when a gap exceeds `max_extraction_gap`.
        privleak_reference: a model directory that never saw the forget set (MUSE's retrained
            reference) for PrivLeak = (AUC_unl − AUC_ref)/AUC_ref·100 of Min-40% forget vs
            holdout; 'auto': the `hf_model_pre_canary` beside the unlearned model's
            `model_path` (the public model of its canary SFT run); None: no PrivLeak. Without a
            real reference the `forget_privleak_*` keys are absent and `privleak_refused` says
            why — never a silent 0.5.
        attack_metrics: a subset of extraction_at_k, rmia (measured before and at the end only).
        attacks: their settings (`AttackSettings`: extraction@k's k, temperature, top-k, seed; RMIA's
            a, γ, population).
        rmia_reference: RMIA's reference model: 'pre_canary' (the `hf_model_pre_canary` beside
            `model_path`: it never saw the forget canaries, so AUC 0.5 means "as if never trained"),
            'start' (the model unlearning starts from: it saw them, so the score measures what
            unlearning changed, and forgotten canaries score *below* holdouts) or a model directory.
            A missing directory is refused at start-up.
    """

    def __init__(
        self,
        formats: list[str] | None = None,
        quant: PTQConfig | None = None,
        lora_deployments: list[str] | None = None,
        every_n_steps: int = 0,
        periodic_metrics: list[str] | None = None,
        evaluate_before: bool = True,
        exposure_references: int | None = 200,
        final_exposure_references: int | None = 1000,
        skewnorm_references: int = 200,
        max_extraction_gap: float = 0.05,
        fail_on_gap: bool = False,
        privleak_reference: str | None = "auto",
        attack_metrics: list[str] | None = None,
        attacks: AttackSettings | None = None,
        rmia_reference: str = "pre_canary",
    ):
        _check_counts(every_n_steps=(every_n_steps, 0), exposure_references=(exposure_references, 1),
                      final_exposure_references=(final_exposure_references, 1),
                      skewnorm_references=(skewnorm_references, 0))
        self.periodic_metrics = tuple(UNLEARNING_METRICS if periodic_metrics is None else periodic_metrics)
        unknown = sorted(set(self.periodic_metrics) - set(UNLEARNING_METRICS))
        if unknown or not self.periodic_metrics:
            raise ValueError(f"PTQGapCallback periodic_metrics must be a non-empty subset of "
                             f"{list(UNLEARNING_METRICS)}, got {periodic_metrics}")
        if not 0.0 <= max_extraction_gap <= 1.0:
            raise ValueError(f"PTQGapCallback max_extraction_gap must lie in [0, 1] (an extraction-rate "
                             f"difference), got {max_extraction_gap}")
        self.formats = list(formats or ["nf4", "fp4"])
        unknown = [f for f in self.formats if canonical_format(f) not in deployment_formats()]
        if unknown or not self.formats:
            raise ValueError(f"unknown quantisation formats {unknown}: choose from {deployment_formats()}")
        self.deployments = list(lora_deployments or ["merged", "adapter"])
        if not self.deployments or set(self.deployments) - {"merged", "adapter"}:
            raise ValueError(f"lora_deployments must be a non-empty subset of ['merged', 'adapter'], got {self.deployments}")
        self.settings = quant if quant is not None else PTQConfig()
        self.every_n_steps = every_n_steps
        self.evaluate_before = evaluate_before
        self.exposure_references = exposure_references
        self.final_exposure_references = final_exposure_references
        self.skewnorm_references = skewnorm_references
        self.max_extraction_gap = max_extraction_gap
        self.fail_on_gap = fail_on_gap
        self.privleak_reference = privleak_reference
        self.attack_metrics = list(attack_metrics or [])
        if set(self.attack_metrics) - {"extraction_at_k", "rmia"}:
            raise ValueError(f"PTQGapCallback attack_metrics must be a subset of ['extraction_at_k', 'rmia'], "
                             f"got {self.attack_metrics}")
        self.attacks = attacks if attacks is not None else AttackSettings()
        self.rmia_reference = rmia_reference
        self._suite: AttackSuite | None = None
        self._auc_reference: float | None = None
        self._privleak_note: dict = {}
        self.exact_fallbacks: dict[str, list[str]] = {}  # variant -> layers run by exact fake quantisation
        self.results: dict | None = None
        self.failure: str | None = None
        self._before: dict[str, float] = {}
        self._restored = False  # the starting model's measurements came from a checkpoint

    # ------------------------------------------------------------ measuring
    def variants(self, module) -> list[tuple[str, str, str]]:
        """(name, format, deployment) of every quantised model to measure."""
        lora = is_peft_model(module.model)
        out = []
        for fmt in self.formats:
            for deployment in (self.deployments if lora else ["merged"]):
                out.append((fmt if deployment == "merged" else f"{fmt}_adapter", fmt, deployment))
        return out

    def measure(self, module, exposure_references: int | None,
                include: tuple[str, ...] = UNLEARNING_METRICS, attacks: bool = True) -> dict[str, float]:
        """`{metric}_{variant}` for variant fp and each quantised copy, and `ptq_gap_*`."""
        suite = self.suite(module) if attacks and self.attack_metrics else None

        wants_roc = "mia" in include and len(module.forget_probe.holdout) > 0

        def evaluate(model):  # one scoring pass for the MIA, its ROC rates and the attacks
            scores = canary_scores(model, module.forget_probe) if wants_roc else None
            found = evaluate_unlearning(model, module.forget_probe, module.retain_members,
                                        exposure_references=exposure_references,
                                        skewnorm_references=self.skewnorm_references, include=include, scores=scores)
            found |= {"forget_mia_roc_loss": roc_rates(scores, "loss")} if scores else {}
            return found | ({f"forget_{k}": v for k, v in suite.measure(model, scores).items()} if suite else {})

        variants = self.variants(module)
        with phase(f"PTQ gap, step {module.global_step}: 1/{len(variants) + 1} full precision"):
            found = {f"{k}_fp": v for k, v in evaluate(module.model).items()}
        for index, (name, fmt, deployment) in enumerate(variants, start=2):
            with phase(f"PTQ gap, step {module.global_step}: {index}/{len(variants) + 1} {name}"):
                quantised = quantised_copy(module.model, fmt, self.settings, deployment)
                measured = evaluate(quantised)
            if fallback := exact_fallback_layers(quantised):
                self.exact_fallbacks[name] = fallback
            for key, value in measured.items():
                found[f"{key}_{name}"] = value
                if key in GAP_METRICS and f"{key}_fp" in found:
                    found[f"ptq_gap_{gap_name(key)}_{name}"] = value - found[f"{key}_fp"]
            del quantised
        if self._auc_reference is not None:
            # the AUCs, not their standard errors (`<auc>_se_<variant>`)
            for key in [k for k in found if k.startswith(PRIVLEAK_AUC) and not k.startswith(PRIVLEAK_AUC + "se_")]:
                variant = key.removeprefix(PRIVLEAK_AUC)
                found[f"forget_privleak_{variant}"] = privleak(found[key], self._auc_reference)
        return found

    def reference_path(self, module) -> Path:
        """RMIA's reference model directory (`rmia_reference`); refused when it is missing."""
        start = Path(getattr(module, "model_path", None) or module.hparams.model_path)
        path = {"start": start, "pre_canary": start.parent / "hf_model_pre_canary"}.get(self.rmia_reference)
        path = Path(self.rmia_reference) if path is None else path
        if not path.is_dir():
            raise ValueError(f"PTQGapCallback rmia_reference={self.rmia_reference!r}: no model directory at {path} "
                             "(rmia needs a reference model: 'pre_canary', 'start' or a directory)")
        return path

    def suite(self, module) -> AttackSuite:
        """The attacks over the forget probe; the reference model is loaded (and scored) once."""
        if self._suite is None:
            rmia = "rmia" in self.attack_metrics
            reference = load_causal_lm(str(self.reference_path(module))).eval() if rmia else None
            self._suite = AttackSuite(module.forget_probe, self.attack_metrics, self.attacks, reference,
                                      "PTQGapCallback.attack_metrics")
        return self._suite

    def reference_auc(self, module) -> None:
        """AUC_ref of the PrivLeak reference model (once), or the reason there is none."""
        path = self.privleak_reference
        if path == "auto":
            model_path = getattr(module, "model_path", None) or getattr(module.hparams, "model_path", None)
            path = str(Path(model_path).parent / "hf_model_pre_canary") if model_path else None
        if path is None or not Path(path).is_dir():
            self._privleak_note = {"privleak_refused": f"no reference model that never saw the forget set "
                                                       f"(looked for {path}); set privleak_reference"}
            return
        reference = load_causal_lm(path).eval()
        found = evaluate_unlearning(reference, module.forget_probe, include=("mia",))
        self._auc_reference = found[PRIVLEAK_AUC.removesuffix("_")]
        self._privleak_note = {"privleak_reference": {"path": str(path), "forget_mia_auc_mink_40": self._auc_reference}}

    def weight_diagnostics(self, module) -> dict[str, float]:
        """Bin-crossing fraction per format and the exact share of changed quantised values."""
        weights = effective_linear_weights(module.model, self.settings.skip_modules)
        out: dict[str, float] = {}
        for fmt in self.formats:
            format_ = deployment_format(fmt)
            crossing = updated = changed = 0
            for name, w1 in weights.items():
                w0 = module.original_weights[name]
                c, u = bin_crossing_counts(w0, w1, format_.bin_width(w0, self.settings))
                crossing, updated = crossing + c, updated + u
                q0, q1 = format_.fake_quantise(w0, self.settings), format_.fake_quantise(w1, self.settings)
                changed += dequantised_change_counts(q0, q1, w0, w1)[0]
            out[f"bin_crossing_fraction_{fmt}"] = crossing / updated if updated else 0.0
            out[f"dequantised_change_fraction_{fmt}"] = changed / updated if updated else 0.0
            out[f"updated_weights_{fmt}"] = updated
        out["updated_weights"] = out[f"updated_weights_{self.formats[0]}"]
        out["quantised_linear_weights"] = sum(w.numel() for w in weights.values())
        out["bin_crossing_fraction"] = out[f"bin_crossing_fraction_{self.formats[0]}"]
        deltas = [(weights[n] - module.original_weights[n]).abs() for n in weights]
        moved = torch.cat([d.reshape(-1) for d in deltas])  # (all quantised weights,)
        moved = moved[moved > 0]
        out["median_abs_update"] = float(moved.median()) if moved.numel() else 0.0
        return out

    def deployment_rows(self, module, values: dict) -> list[dict]:
        """`values` (keys `<metric>_<name>`) as one row per measured model: fp and each deployment."""
        names = ["fp"] + [name for name, _, _ in self.variants(module)]
        rows = {name: {"deployment": name, "format": name.removesuffix("_adapter"),
                       "lora": "adapter" if name.endswith("_adapter") else "merged"} for name in names}
        by_length = sorted(names, key=len, reverse=True)  # `nf4_adapter` before `nf4`
        for key, value in values.items():
            name = next((n for n in by_length if key.endswith(f"_{n}")), None)
            if name is not None:
                rows[name][key.removesuffix(f"_{name}")] = value
        return list(rows.values())

    def _log(self, trainer, module, values: dict[str, float]) -> None:
        rows = self.deployment_rows(module, values)
        metrics = sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float))})
        log_table_rows(trainer.loggers, "ptq", rows, ("deployment", "format", "lora"), metrics,
                       trainer.global_step, lambda row: row["deployment"])

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse, before any training, a missing RMIA reference model and a bitsandbytes block wider
        than a quantised layer's rows."""
        if "rmia" in self.attack_metrics:
            self.reference_path(pl_module)
        if not any(deployment_format(fmt).blockwise for fmt in self.formats):
            return
        widths = {name: linear_weight(linear).shape[1] for name, linear in  # d_in of (d_out, d_in)
                  quantisable_linears(pl_module.model, self.settings.skip_modules).items()}
        narrow = {name: width for name, width in widths.items() if width < self.settings.blocksize}
        if narrow:
            name, width = next(iter(narrow.items()))
            raise ValueError(f"PTQGapCallback blocksize={self.settings.blocksize} is larger than the width of "
                             f"{len(narrow)} quantised layer(s) (e.g. {name}: {width} inputs): choose a blocksize "
                             f"≤ {min(narrow.values())} (bitsandbytes allows 64 and up) or add those layers "
                             "to skip_modules")

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored:  # a resumed run: the starting model was measured before the checkpoint
            return
        if self.privleak_reference is not None:
            self.reference_auc(pl_module)
        if self.evaluate_before:
            self._before = self.measure(pl_module, self.final_exposure_references)
            self._log(trainer, pl_module, self._before)

    def state_dict(self) -> dict:
        """The measurements of the starting model (`*_before`, PrivLeak's reference AUC) for a
        checkpoint: a resumed run reports them instead of measuring its resumed weights."""
        return {"before": self._before, "auc_reference": self._auc_reference, "privleak_note": self._privleak_note}

    def load_state_dict(self, state_dict: dict) -> None:
        self._before = state_dict["before"]
        self._auc_reference = state_dict["auc_reference"]
        self._privleak_note = state_dict["privleak_note"]
        self._restored = True

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        final = 0 <= trainer.max_steps <= step  # the final measurement follows at fit end
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and not final:
            values = self.measure(pl_module, self.exposure_references, self.periodic_metrics, attacks=False)
            write_json_atomic(pl_module.run_dir / f"ptq_gap_step{step}.json", values)
            self._log(trainer, pl_module, values)

    def on_fit_end(self, trainer, pl_module) -> None:
        # `on_fit_end`: after the module's `on_train_end` (its final report) and the model export
        # (`AdapterExportCallback.on_train_end`), so quantised copies never run before the model is safe.
        if trainer.is_global_zero:
            self.finish(trainer, pl_module)
        # rank 0 measured; every rank raises with it, so no DDP rank exits 0 on a failed check
        self.failure = broadcast_from_zero(trainer.strategy, self.failure)
        if self.fail_on_gap and self.failure:
            raise PTQGapError(self.failure)

    def finish(self, trainer, pl_module) -> None:
        """The final measurement: `ptq_gap.json`, and `failure` when a gap exceeds the limit."""
        start = time.perf_counter()
        results = self.measure(pl_module, self.final_exposure_references)
        results |= self.weight_diagnostics(pl_module)
        results |= {f"{k}_before": v for k, v in self._before.items() if not k.startswith("ptq_gap_")}
        worst = {name: results[f"ptq_gap_extraction_{name}"] for name, _, _ in self.variants(pl_module)}
        failing = {k: v for k, v in worst.items() if v > self.max_extraction_gap}
        results["variants"] = list(worst)
        results["max_extraction_gap"] = self.max_extraction_gap
        results["forgetting_survives"] = not failing
        if failing:
            self.failure = (f"forgetting does not survive quantisation: forget extraction gap "
                            f"{', '.join(f'{k} {v:+.3f}' for k, v in failing.items())} exceeds "
                            f"+{self.max_extraction_gap:.3f} (full precision "
                            f"{results['forget_extraction_fp']:.3f})")
        results["status"] = "failed" if (failing and self.fail_on_gap) else "ok"
        results["quantisation"] = {fmt: self.settings.describe(fmt) for fmt in self.formats}
        if self.exact_fallbacks:  # layers this host's 4-bit kernel computed wrongly (`bnb4_exact`)
            results["exact_fake_quantised_layers"] = self.exact_fallbacks
        results |= self._privleak_note
        results["steps"] = trainer.global_step
        results["seconds"] = time.perf_counter() - start
        self.results = results
        write_json_atomic(pl_module.run_dir / "ptq_gap.json", results)
        self._log(trainer, pl_module, {k: v for k, v in results.items() if not k.endswith("_before")})
        log_figures(trainer.loggers, "ptq_final/figures", lambda: ptq_gap_figures(results), trainer.global_step)
        rank_zero_info(f"PTQ gap written to {pl_module.run_dir / 'ptq_gap.json'}: forget extraction fp "
                       f"{results['forget_extraction_fp']:.3f}, "
                       + ", ".join(f"{k} {results[f'forget_extraction_{k}']:.3f}" for k in worst))
        if self.failure:
            rank_zero_info(f"PTQGapCallback: {self.failure}")
