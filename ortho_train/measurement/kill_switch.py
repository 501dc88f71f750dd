"""The kill-switch table: sieve a fine-tuned model every way and measure each α (no Lightning).

Rows (one per model evaluated), keys `variant, alpha, rho, extraction_rate, exposure_mean,
mia_auc_loss, public_ppl, bits_per_weight, ortho_density` plus a few extras:
- references: `fp32` (the fine-tuned model), `intK_<method>` (it, quantised by a registered
  base quantiser: `intK_rtn`, `intK_gptq`), any registered deployment format (`nf4` / `fp4`:
  bitsandbytes; its fake-quantised copy, `ortho_train.quantisation.quantised_copy`), `pre_sft`
  (the public model before fine-tuning) and `intK_pre_sft` (its base stream: Q(W_pre), the
  model α = 0 of `delta`/`isolated` is);
- sieves: `posthoc` and `delta` at every ρ of the list, `isolated` at its training ρ, each at
  every α of the list; `posthoc_dqc` / `delta_dqc` are the same sieves (same base, same ortho
  positions) with DQC-compensated ortho values (the HOP/DQC paper, "A Geometric Theory of
  Functionally Sensitive Outlier Separability"), so DQC is measured beside plain GPTQ;
- `ogd`: an OGD-projected fine-tune's W(α) = W_public_path + α·ΔW_priv at every α (ΔW_priv
  rebuilt from its fp16 eigen-coefficients); its bits count the fp32 public path, and for
  α > 0 the coefficients plus the fp16 eigenbases they need; ortho_density is the share of
  eigen-directions off S_gen (the stored coefficients).
Every row whose MIA was measured here also holds `mia_roc_loss`, the LOSS attack's ROC rates
`{fpr, tpr}` (members vs holdout; no score, no text), which the report draws per row; a row
whose MIA came from `known` has none (the run's own `roc.json` holds that model's curves).
bits_per_weight counts the sieved linears only (packed codes + fp16 scales/zeros + 48-bit COO
entries); embeddings, norms and the LM head (unless sieved) are fp32 in every row. An α = 0
row counts the base stream only (the base file alone is that model); α > 0 rows count both.

With `hop_report` every sieve also records, per layer, the HOP per-column error report of its
base error ΔW = dequant(base) − W_ft (`ortho_train.sieve.select.hop_report`) and the layer
losses tr(ΔW H ΔWᵀ) at α = 0 and α = 1, in `KillSwitchTable.hop` (one entry per sieve and ρ).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Iterable

import torch
from torch import nn

from ortho_kernels import OrthoStream, QuantisedBase
from ortho_train import metrics
from ortho_train.evaluation import METRIC_GROUP_KEYS, canary_scores, evaluate_memorisation, groups_known
from ortho_train.measurement.attacks import ATTACK_METRICS, AttackSuite
from ortho_train.measurement.formatting import attack_cells, attack_head, format_auc, format_value, markdown_table
from ortho_train.measurement.kill_switch_config import (ATTACK_KEYS, EXTRA_KEYS, MEASURED_KEYS, MIA_EXTRA_KEYS,
                                                       ROW_KEYS, SIEVED_VARIANTS, VARIANTS, TableConfig,
                                                       int_reference)
from ortho_train.measurement.progress import RowMeter
from ortho_train.model_fingerprint import model_fingerprint
from ortho_train.ortho_linear import set_alpha
from ortho_train.private_streams import PrivateStreams, SubspaceStreams, SupportStreams
from ortho_train.quantisation import PTQConfig, base_quantiser, deployment_format, quantised_copy
from ortho_train.sieve.core import SievedLayer, SieveConfig
from ortho_train.sieve.model import build_dual_stream_model, quantised_layers, sieve_model, stream_stats

__all__ = ["ATTACK_KEYS", "EXTRA_KEYS", "KillSwitchTable", "MEASURED_KEYS", "MIA_EXTRA_KEYS", "ROW_KEYS",
           "SIEVED_VARIANTS", "TableConfig", "VARIANTS", "format_row", "int_reference", "to_markdown"]  # the config's names too


class KillSwitchTable:
    """Builds and evaluates the rows; `run()` returns them as a list of dicts.

    Args:
        model: the fine-tuned model (not modified; copies are sieved).
        pre_model: the pre-fine-tuning model (same architecture) or None.
        probe: the `MemorisationProbe` of the run.
        hessians_of: callable(model) -> {layer: H} over public calibration text.
        streams: the private fine-tune's streams, or None. `SupportStreams` of an isolated
            fine-tune give the `isolated` rows (and, when `bases_are_pre`, their Q(W_pre) bases
            serve the `intK_pre_sft` rows; not after public base updates); `SubspaceStreams`
            of an OGD fine-tune give the `ogd` rows.
        log: callable(str) for each finished row's one-line summary.
        meter: times and sizes the rows and prints what each is computing (default: a
            `RowMeter` titled "kill-switch table").
        known: metrics already measured on some of the table's models, by `model_fingerprint`
            (e.g. the run's final evaluation of the fine-tuned model, the public model's
            perplexity): a row of such a model measures only the groups they do not cover
            (`evaluation.groups_known`; exposure always, at the table's own settings).
        audit_delta: δ of the one-run audit (a DP run's own; None: `config.attacks.audit.delta`).
        calibration_of: callable() -> the public calibration batches themselves, which a
            true-sequential spec (`spec.quant.true_sequential`) walks block by block instead of
            taking Hessians of the float model; required with one.

    The `rmia`, `extraction_at_k` and `audit` metrics (`ortho_train.measurement.attacks`) use
    `pre_model` as the reference model; asked for without one, the table refuses at construction.
    """

    def __init__(self, model: nn.Module, pre_model: nn.Module | None, probe, config: TableConfig,
                 hessians_of: Callable[[nn.Module], dict[str, torch.Tensor]],
                 streams: PrivateStreams | None = None,
                 log: Callable[[str], None] = print, known: dict[str, dict] | None = None,
                 meter: RowMeter | None = None, audit_delta: float | None = None,
                 calibration_of: Callable[[], Iterable[dict]] | None = None):
        if config.spec.quant.true_sequential and calibration_of is None:
            raise ValueError("table.spec.quant.true_sequential=True walks the calibration batches block by block: "
                             "this table was given Hessians only (calibration_of=None)")
        self.model, self.pre_model, self.probe, self.config = model, pre_model, probe, config
        self.calibration_of = calibration_of
        self.attacks = AttackSuite(probe, config.metrics, config.attacks, pre_model, "table.metrics", audit_delta)
        self.hessians_of, self.log = hessians_of, log
        self.isolated = streams if isinstance(streams, SupportStreams) else None
        self.ogd = streams if isinstance(streams, SubspaceStreams) else None
        self._hessians: dict[int, dict] = {}
        self._measured: dict[str, dict] = {}  # model fingerprint -> metrics (identical models: once)
        self.known = known or {}
        self.rows: list[dict] = []
        self.meter = meter if meter is not None else RowMeter("kill-switch table")
        self.meter.total = self.meter.total or self.expected_rows()
        self.hop: list[dict] = []  # with config.hop_report: per sieve, per layer, per column

    def expected_rows(self) -> int:
        """Rows `run()` will produce (a skipped isolated / ogd variant has none)."""
        c, rows = self.config, len(self.config.references)
        for variant in c.variants:
            if variant in ("isolated", "ogd"):
                rows += len(c.alphas) if (self.isolated if variant == "isolated" else self.ogd) else 0
            else:
                rows += len(c.rhos) * len(c.alphas)
        return rows

    # ----------------------------------------------------------------- pieces
    def hessians(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if id(model) not in self._hessians:
            self._hessians[id(model)] = self.hessians_of(model)
        return self._hessians[id(model)]

    def calibration(self, model: nn.Module, spec: SieveConfig, needed: bool = True) -> dict:
        """What a whole-model quantisation of `model` under `spec` is given: `calibration` batches when
        true-sequential (each Hessian after the layers before it are quantised), else `hessians` of
        the float model (None where not `needed`)."""
        if spec.quant.true_sequential:
            return {"calibration": self.calibration_of()}
        return {"hessians": self.hessians(model) if needed else None}

    def spec_with(self, bits: int | None = None, method: str | None = None, rho: float | None = None,
                  dqc: bool | None = None) -> SieveConfig:
        """The table's sieve spec with the bits, quantiser, ρ or DQC replaced where given."""
        s = self.config.spec
        method = method or s.quant.method
        quant = replace(s.quant, method=method, bits=bits or s.quant.bits,  # RTN rows: no Hessian to order
                        true_sequential=s.quant.true_sequential and base_quantiser(method).needs_hessian)
        return replace(s, quant=quant, rho=s.rho if rho is None else rho, dqc=s.dqc if dqc is None else dqc)

    def _require_pre(self, what: str) -> nn.Module:
        if self.pre_model is None:
            raise ValueError(f"{what} needs the pre-fine-tuning model (none was given)")
        return self.pre_model

    def pre_bases(self, bits: int) -> tuple[dict[str, QuantisedBase], str]:
        """Q(W_pre): the isolated fine-tune's own bases when it has them at these bits."""
        if self.isolated is not None and self.isolated.bases_are_pre:
            bases = self.isolated.bases
            first = next(iter(bases.values()))
            if first.bits == bits:
                return bases, "isolated SFT base"
        pre = self._require_pre("a pre-fine-tuning base")
        spec = self.spec_with(bits)
        layers = quantised_layers(pre, spec, **self.calibration(pre, spec, spec.quant.quantiser.needs_hessian))
        return {n: layer.base for n, layer in layers.items()}, spec.quant.name

    def _evaluate(self, model: nn.Module) -> dict:
        """Metrics of `model`, reused when a row before it computed the very same function."""
        key = model_fingerprint(model)
        if key not in self._measured:
            c, known = self.config, self.known.get(key, {})
            reused = groups_known(known, c.metrics)
            found = {k: known[k] for g in reused for k in METRIC_GROUP_KEYS[g]}
            include = tuple(m for m in c.metrics if m not in reused and m not in ATTACK_METRICS)
            wants_roc = "mia" in include and len(self.probe.holdout) > 0
            scores = canary_scores(model, self.probe) if self.attacks.needs_scores or wants_roc else None
            found |= evaluate_memorisation(
                model, self.probe, exposure_canaries=c.exposure_canaries,
                exposure_references=c.exposure_references, include=include,
                skewnorm_references=0,  # the table shows the exact rank only
                decode_holdout=False, scores=scores)  # holdout exact match by teacher forcing
            if wants_roc:  # the report draws each row's ROC: rates only, no score
                found["mia_roc_loss"] = roc_rates(scores, "loss")
            self._measured[key] = found | (self.attacks.measure(model, scores) if self.attacks.active else {})
        return self._measured[key]

    def measure(self, variant: str, model: nn.Module, alpha, rho, bits: float, density: float,
                base: str | None) -> dict:
        """Evaluate `model` and append its row (other tables build rows of their own models here)."""
        self.meter.stage(f"{variant} α={format_value(alpha, 2)} ρ={format_value(rho, 3)} — evaluating "
                         f"{', '.join(self.config.metrics)}")
        found = self._evaluate(model)
        row = {"variant": variant, "alpha": alpha, "rho": rho,
               **{k: found.get(k) for k in MEASURED_KEYS},
               "bits_per_weight": bits, "ortho_density": density,
               "holdout_extraction_rate": found.get("holdout_extraction_rate"),
               "symbol_accuracy": found.get("symbol_accuracy"),
               **{k: found.get(k) for k in MIA_EXTRA_KEYS}, "base": base,
               "mia_roc_loss": found.get("mia_roc_loss"),
               **{k: v for k, v in found.items() if k in ATTACK_KEYS or _is_rmia_tpr(k)}}
        self.rows.append(self.meter.record(row))
        self.log(format_row(row))
        return row

    def _record_hop(self, variant: str, layers: dict[str, SievedLayer], rho: float, base: str,
                    dqc: bool, hessians: str) -> None:
        """Keep the per-layer HOP reports of one sieve (layers sieved with `report=True`)."""
        self.hop.append({
            "variant": variant, "rho": rho, "dqc": dqc, "base": base, "hessians": hessians,
            "layers": {name: {k: v for k, v in layer.stats.items() if k != "hop"} | layer.stats["hop"]
                       for name, layer in layers.items() if "hop" in layer.stats},
        })

    def _sieved_rows(self, variant: str, layers: dict[str, SievedLayer], rho: float, base: str) -> None:
        dual = build_dual_stream_model(self.model, layers)
        stats = stream_stats(dual)
        for alpha in self.config.alphas:
            set_alpha(dual, alpha)
            bits = stats["bits_per_weight"] if alpha != 0 else stats["base_bits_per_weight"]
            self.measure(variant, dual, alpha, rho, bits, stats["ortho_density"], base)

    # ------------------------------------------------------------------- rows
    def reference(self, name: str) -> None:
        self.meter.stage(f"{name} reference — building its model")
        if name == "fp32":
            self.measure("fp32", self.model, None, None, 32.0, 0.0, None)
        elif name == "pre_sft":
            self.measure("pre_sft", self._require_pre("pre_sft"), None, None, 32.0, 0.0, None)
        elif int_reference(name) is None:  # a deployment format (`int4_rtn` is a base stream row, packed)
            self.deployed_reference(name)
        else:
            bits, kind = int_reference(name)
            if kind == "pre_sft":
                bases, how = self.pre_bases(bits)
                layers = {n: SievedLayer(b, _empty(b), {}) for n, b in bases.items()}
                dual = build_dual_stream_model(self._require_pre(name), layers)
            else:
                spec = self.spec_with(bits, kind)
                layers = quantised_layers(self.model, spec,
                                          **self.calibration(self.model, spec, spec.quant.quantiser.needs_hessian))
                dual, how = build_dual_stream_model(self.model, layers), spec.quant.name
            self.measure(name, dual, None, 0.0, stream_stats(dual)["bits_per_weight"], 0.0, how)

    def deployed_reference(self, name: str) -> None:
        """The row of a deployment format: the model's fake-quantised copy (dense linears holding
        dequantise(quantise(W)); the LM head only with `include_lm_head`, never a tied one)."""
        settings = PTQConfig(group_size=self.config.spec.quant.group_size, skip_modules=[])
        fmt = deployment_format(name)
        copy_ = quantised_copy(self.model, name, settings, include_lm_head=self.config.spec.include_lm_head,
                               deployed_modules=False)
        self.measure(name, copy_, None, None, fmt.bits_per_weight(settings), 0.0, fmt.label(settings))

    def _ogd_rows(self) -> None:
        streams = self.ogd
        if streams is None:
            self.log("ogd: skipped (the model was not fine-tuned with OGD)")
            return
        bits = streams.bits_per_weight()
        for alpha in self.config.alphas:
            model = copy.deepcopy(self.model)
            with torch.no_grad():
                for name, (weight, bias) in streams.weights_at(alpha).items():
                    module = model.get_submodule(name)
                    module.weight.copy_(weight)
                    if bias is not None:
                        module.bias.copy_(bias)
            private = bits["coefficients"] + bits["basis"] if alpha != 0 else 0.0
            self.measure("ogd", model.eval(), alpha, None, 32.0 + private,
                      bits["free_fraction"] if alpha != 0 else 0.0,
                      f"fp32 public path; ΔW_priv off S_gen ({streams.subspace})")

    def variant(self, variant: str) -> None:
        if variant == "ogd":
            self._ogd_rows()
            return
        if variant == "isolated":
            if self.isolated is None:
                self.log("isolated: skipped (the model was not fine-tuned with isolation)")
                return
            streams = self.isolated
            spec = self.spec_with(next(iter(streams.bases.values())).bits)
            report = self.config.hop_report  # the Hessians serve the report only: S and the base are fixed
            layers = sieve_model(self.model, "isolated", spec, self.hessians(self.model) if report else None,
                                 supports=streams.masks, bases=streams.bases, report=report)
            base = "isolated SFT base" if streams.bases_are_pre else "base re-quantised after public updates"
            if report:
                self._record_hop("isolated", layers, streams.rho, base, False, "fine-tuned model")
            self._sieved_rows("isolated", layers, streams.rho, base)
            return
        plain = variant.removesuffix("_dqc")
        dqc = True if variant.endswith("_dqc") else None  # plain rows: the spec's own setting
        report = self.config.hop_report
        for rho in self.config.rhos:
            self.meter.stage(f"{variant} ρ={rho:g} — sieving")
            spec = self.spec_with(rho=rho, dqc=dqc)
            if plain == "posthoc":
                layers = sieve_model(self.model, "posthoc", spec, report=report, **self.calibration(self.model, spec))
                base, hessians = f"{spec.quant.name} of the fine-tuned weights", "fine-tuned model"
            else:
                pre = self._require_pre("the delta sieve")
                bases, how = self.pre_bases(spec.quant.bits)
                layers = sieve_model(self.model, "delta", spec, self.hessians(pre),
                                     pre_state=pre.state_dict(), bases=bases, report=report)
                base, hessians = how, "pre-fine-tuning model"
            if spec.dqc:
                base += f" + DQC γ={spec.dqc_gamma:g}"
            if report:
                self._record_hop(variant, layers, rho, base, spec.dqc, hessians)
            self._sieved_rows(variant, layers, rho, base)

    def run(self) -> list[dict]:
        for name in self.config.references:
            self.reference(name)
        for variant in self.config.variants:
            self.variant(variant)
        return self.rows


def roc_rates(scores: dict, score: str) -> dict[str, list[float]]:
    """The ROC of one MIA score, members vs holdout (`canary_scores`), as rounded rates only."""
    fpr, tpr = metrics.roc_curve(scores["members"][score], scores["holdout"][score])
    return {"fpr": [round(v, 5) for v in fpr], "tpr": [round(v, 5) for v in tpr]}


def _is_rmia_tpr(key: str) -> bool:
    return key.startswith("mia_tpr_at_") and key.endswith("_fpr_rmia")


def _empty(base: QuantisedBase) -> OrthoStream:
    return OrthoStream.empty(base.shape, base.device)


def format_row(row: dict) -> str:
    at_k = f" (@k {format_value(row['extraction_at_k'], 2)})" if "extraction_at_k" in row else ""
    rmia = f", RMIA AUC {format_auc(row, 'mia_auc_rmia')}" if "mia_auc_rmia" in row else ""
    audit = f", audit ε ≥ {format_value(row['audit_epsilon_lb'], 2)}" if "audit_epsilon_lb" in row else ""
    return (f"{row['variant']:>13} α={format_value(row['alpha'], 2)} ρ={format_value(row['rho'], 3)}: "
            f"extraction {format_value(row['extraction_rate'], 2)}{at_k}, "
            f"exposure {format_value(row['exposure_mean'], 2)}, MIA AUC {format_auc(row)}{rmia}{audit}, "
            f"PPL {format_value(row['public_ppl'])}, "
            f"{format_value(row['bits_per_weight'], 2)} bits/w, density {format_value(row['ortho_density'], 4)} "
            f"({row['seconds']} s)")


def to_markdown(rows: list[dict], notes: list[str] = ()) -> str:
    """The table; the attack columns (extraction@k, RMIA, audit) appear where the rows have them."""
    head = ("| variant | α | ρ | extraction | holdout extr. | exposure | MIA AUC (loss) ± SE"
            + attack_head(rows) + " | public PPL | bits/weight | ortho density | base |")
    cells = [[r["variant"], format_value(r["alpha"], 2), format_value(r["rho"], 3),
              format_value(r["extraction_rate"], 2), format_value(r.get("holdout_extraction_rate"), 2),
              format_value(r["exposure_mean"], 2), format_auc(r), *attack_cells(r, rows),
              format_value(r["public_ppl"]), format_value(r["bits_per_weight"], 2),
              format_value(r["ortho_density"], 4), r.get("base") or ""]
             for r in rows]
    return markdown_table(head, cells, notes)
