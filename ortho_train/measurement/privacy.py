"""The privacy table: a fine-tuned model beside its post-hoc privacy treatments (no Lightning).

Rows (one per model evaluated; `kind` names the row family):
- `run`: the run itself. With a support (isolated or DP-SGD on S) its sieved model at every α
  of the list (α = 0 is the quantised public model: it never saw a canary, ε = 0); without one
  (dense SFT, DP-SGD with global scope) the trained model, no α.
- `posthoc_global` / `posthoc_dual` at every σ of `posthoc_sigmas`: the α = 1 weights
  W = dequant(base) + ortho plus Gaussian noise of std σ·RMS(W) per layer, on every sieved
  weight or on the ortho support only (`apply_posthoc_noise_`; same draws in both modes).
- `int4_gptq`: GPTQ INT-k of the trained weights (`int<k>_gptq`, the format's one name);
  `int4_gptq_noise` at every posthoc σ: its
  dequantised weights plus the global post-hoc noise (the stochastic-quantisation paper's
  "GPTQ + Gaussian noise" baseline).
- `stochastic_quant` at every σ of `stochastic_sigmas` (lattice steps): the regular weights'
  codes drawn from a discrete Gaussian around their exact position, the outliers (the support)
  in the ortho stream with DQC compensation ("DQC + stochastic quantisation").

The support is the run's own S when it has one; otherwise a post-hoc sieve of the trained
model at `rho` picks the ortho entries. Columns: ε (the run's ε for every row derived from a
DP-SGD model, since post-processing keeps it; 0 for α = 0 of a support; "none" otherwise),
`noise` (the post-hoc σ or the lattice σ: a noise scale, never an ε — weight noise has no
sensitivity bound), extraction, exposure, MIA AUC (LOSS, Min-K%++), TPR at 1% FPR, public
PPL, bits per weight. With `audit` in the metrics, `audit ε ≥` stands next to ε: the lower bound of
"Privacy Auditing with One (1) Training Run" at the run's δ (`ortho_train.privacy.audit`), which an
honest accountant's ε can never fall below (beyond the audit's 5% chance of error); with `rmia` and
`extraction_at_k`, the RMIA and extraction@k columns (`ortho_train.measurement.attacks`). Evaluation and row bookkeeping are the kill-switch table's
(`ortho_train.measurement.kill_switch.KillSwitchTable.measure`, which also times and sizes each row).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ortho_train.measurement.attacks import ATTACK_METRICS, AttackSettings
from ortho_train.measurement.formatting import attack_cells, attack_head, format_auc, format_value, markdown_table
from ortho_train.measurement.kill_switch import KillSwitchTable, TableConfig
from ortho_train.measurement.progress import RowMeter
from ortho_train.ortho_linear import set_alpha
from ortho_train.private_streams import PrivateStreams, SupportStreams
from ortho_train.privacy.posthoc_noise import MODES, apply_posthoc_noise_
from ortho_train.privacy.stochastic_quant import StochasticQuantConfig, stochastic_quantise_model
from ortho_train.quantisation import QuantConfig
from ortho_train.sieve.core import SievedLayer, SieveConfig
from ortho_train.sieve.model import build_dual_stream_model, quantised_layers, sieve_model, stream_stats

COLUMNS = ("kind", "alpha", "epsilon", "noise", "extraction_rate", "exposure_mean", "mia_auc_loss", "mia_auc_loss_se",
           "mia_auc_minkpp", "mia_tpr_at_1pct_fpr_loss", "mia_tpr_at_1pct_fpr_minkpp", "public_ppl",
           "bits_per_weight")
METRICS = ("extraction", "exposure", "mia", "ppl") + ATTACK_METRICS


@dataclass
class PrivacyTableConfig:
    """What the privacy table contains.

    Args:
        alphas: α values of the run's sieved model (with a support).
        posthoc_sigmas: post-hoc noise scales σ (noise std σ·RMS(W) per layer).
        stochastic_sigmas: discrete-Gaussian std of stochastic quantisation, in lattice steps.
        bits / group_size: INT-k lattice of GPTQ and stochastic quantisation.
        true_sequential: the GPTQ row and a post-hoc sieve quantise block by block, each Hessian after
            the layers before it (`QuantConfig.true_sequential`); the stochastic rows keep the float
            model's Hessians.
        rho: ortho fraction of the post-hoc sieve when the run has no support of its own.
        include_lm_head: the LM head is among the sieved/quantised/noised linears.
        metrics: subset of extraction, exposure, mia, ppl, rmia, extraction_at_k, audit (the last
            three: `ortho_train.measurement.attacks`; rmia and an RMIA audit need the pre-canary model).
        exposure_references / exposure_canaries: exposure cost (None: all).
        seed: seed of the post-hoc noise and the stochastic codes.
        attacks: settings of rmia, extraction_at_k and audit (the audit's δ is the run's own when it
            ran DP-SGD, else `attacks.audit.delta`).
    """

    alphas: list[float] = field(default_factory=lambda: [0.0, 1.0])
    posthoc_sigmas: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1])
    stochastic_sigmas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    bits: int = 4
    group_size: int = 128
    true_sequential: bool = False
    rho: float = 0.05
    include_lm_head: bool = False
    metrics: list[str] = field(default_factory=lambda: ["extraction", "exposure", "mia", "ppl"])
    exposure_references: int | None = 1000
    exposure_canaries: int | None = None
    seed: int = 0
    attacks: AttackSettings = field(default_factory=AttackSettings)

    def __post_init__(self) -> None:
        self.alphas = [float(a) for a in self.alphas]
        self.posthoc_sigmas = [float(s) for s in self.posthoc_sigmas]
        self.stochastic_sigmas = [float(s) for s in self.stochastic_sigmas]
        bad = [s for s in self.posthoc_sigmas + self.stochastic_sigmas if not 0 <= s < math.inf]
        if bad:
            raise ValueError(f"privacy table sigmas must be finite and ≥ 0, got {bad}")
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"dp table metrics must be among {METRICS}, got {unknown}")
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"dp table rho must lie in (0, 1), got {self.rho}")
        StochasticQuantConfig(bits=self.bits, group_size=self.group_size)  # checks bits and group size
        self.table_config()  # the α list and the measuring settings are checked there too

    def table_config(self) -> TableConfig:
        """The kill-switch table settings its measuring and GPTQ rows run with."""
        spec = SieveConfig(QuantConfig("gptq", self.bits, self.group_size, true_sequential=self.true_sequential),
                           rho=self.rho, include_lm_head=self.include_lm_head)
        return TableConfig(variants=["isolated"], references=[f"int{self.bits}_gptq"], alphas=self.alphas,
                           rhos=[self.rho], spec=spec, metrics=self.metrics,
                           exposure_references=self.exposure_references,
                           exposure_canaries=self.exposure_canaries, attacks=self.attacks)


def dense_model(model: nn.Module, layers: dict[str, SievedLayer]) -> nn.Module:
    """A copy of `model` whose sieved linears hold W = dequant(base) + ortho (the α = 1 weights)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in layers.items():
            weight = out.get_submodule(name).weight
            dense = layer.base.dequantise() + layer.ortho.to_dense()
            weight.copy_(dense.to(weight.device, weight.dtype))
    return out.eval()


def ortho_masks(layers: dict[str, SievedLayer]) -> dict[str, torch.Tensor]:
    """layer name -> bool mask of the entries its ortho stream holds."""
    out = {}
    for name, layer in layers.items():
        mask = torch.zeros(layer.base.shape, dtype=torch.bool)
        rows, cols = layer.ortho.rows_cols()
        mask[rows.cpu(), cols.cpu()] = True
        out[name] = mask
    return out


class PrivacyTable:
    """Builds and evaluates the rows; `run()` returns them as a list of dicts.

    Args:
        model: the fine-tuned model (not modified).
        probe: the run's `MemorisationProbe`.
        config: what to measure.
        hessians_of: callable(model) -> {layer: H} over public calibration text.
        streams: the run's private streams (a `SupportStreams` gives the support rows).
        epsilon: ε of the run's DP-SGD (None: not private).
        delta: δ of the run's DP-SGD (the audit's δ; None: `config.attacks.audit.delta`).
        pre_model: the pre-canary model, the reference of rmia and of an RMIA audit (None: refused
            when those are asked for).
        log: callable(str) for each finished row's one-line summary.
        meter: times and sizes the rows and prints what each is computing (default: a
            `RowMeter` titled "privacy table").
        calibration_of: callable() -> the calibration batches a true-sequential spec walks
            (`KillSwitchTable`); the noise rows keep the float model's Hessians.
    """

    def __init__(self, model: nn.Module, probe, config: PrivacyTableConfig,
                 hessians_of: Callable[[nn.Module], dict[str, torch.Tensor]],
                 streams: PrivateStreams | None = None, epsilon: float | None = None,
                 log: Callable[[str], None] = print, meter: RowMeter | None = None,
                 delta: float | None = None, pre_model: nn.Module | None = None,
                 calibration_of: Callable[[], Iterable[dict]] | None = None):
        self.model, self.config, self.epsilon, self.log = model, config, epsilon, log
        self.support = streams if isinstance(streams, SupportStreams) else None
        self.meter = meter if meter is not None else RowMeter("privacy table")
        self.meter.total = self.meter.total or self.expected_rows()
        self.sieve = KillSwitchTable(model, pre_model, probe, config.table_config(), hessians_of, self.support, log,
                                     meter=self.meter, audit_delta=delta, calibration_of=calibration_of)
        self.rows: list[dict] = []

    def expected_rows(self) -> int:
        """Rows `run()` will produce: the run's, post-hoc global and dual, GPTQ with and without noise,
        stochastic quantisation."""
        c = self.config
        run = len(c.alphas) if self.support is not None else 1
        return run + 3 * len(c.posthoc_sigmas) + 1 + len(c.stochastic_sigmas)

    def _add(self, row: dict, kind: str, epsilon, noise: float | None = None) -> None:
        row.update(kind=kind, epsilon="none" if epsilon is None else epsilon, noise=noise)
        self.rows.append(row)

    def layers(self) -> dict[str, SievedLayer]:
        """The run's sieved layers: its support with its bases, or a post-hoc sieve at ρ."""
        spec = self.sieve.spec_with(self.config.bits)
        if self.support is not None:
            return sieve_model(self.model, "isolated", spec, supports=self.support.masks,
                               bases=self.support.bases)
        return sieve_model(self.model, "posthoc", spec, **self.sieve.calibration(self.model, spec))

    def run_rows(self, layers: dict[str, SievedLayer]) -> None:
        if self.support is None:
            row = self.sieve.measure("run", self.model, None, None, 32.0, 0.0, "the trained model")
            self._add(row, "run", self.epsilon)
            return
        dual = build_dual_stream_model(self.model, layers)
        stats = stream_stats(dual)
        for alpha in self.config.alphas:
            set_alpha(dual, alpha)
            bits = stats["bits_per_weight"] if alpha != 0 else stats["base_bits_per_weight"]
            row = self.sieve.measure("run", dual, alpha, self.support.rho, bits, stats["ortho_density"],
                                     "the run's support and base")
            self._add(row, "run", 0.0 if alpha == 0 else self.epsilon)

    def posthoc_rows(self, layers: dict[str, SievedLayer]) -> None:
        base = dense_model(self.model, layers)
        masks = ortho_masks(layers)
        dual_bits = stream_stats(build_dual_stream_model(self.model, layers))["bits_per_weight"]
        for sigma in self.config.posthoc_sigmas:
            for mode in MODES:  # global noise leaves the lattice: fp32 weights
                noisy = copy.deepcopy(base)
                apply_posthoc_noise_(noisy, masks, sigma, mode, self.config.seed)
                bits = 32.0 if mode == "global" else dual_bits
                where = "every sieved weight" if mode == "global" else "S"
                row = self.sieve.measure(f"posthoc_{mode}", noisy, 1.0, None, bits, 0.0,
                                         f"σ·RMS(W) noise on {where}")
                self._add(row, f"posthoc_{mode}", self.epsilon, sigma)

    def gptq_rows(self) -> None:
        spec = self.sieve.spec_with(self.config.bits, "gptq")
        quantised = quantised_layers(self.model, spec, **self.sieve.calibration(self.model, spec))
        dual = build_dual_stream_model(self.model, quantised)
        name = spec.quant.name  # int<k>_gptq
        row = self.sieve.measure(name, dual, None, 0.0, stream_stats(dual)["bits_per_weight"], 0.0, name)
        self._add(row, name, self.epsilon)
        base = dense_model(self.model, quantised)
        masks = {name: torch.ones(layer.base.shape, dtype=torch.bool) for name, layer in quantised.items()}
        for sigma in self.config.posthoc_sigmas:
            noisy = copy.deepcopy(base)
            apply_posthoc_noise_(noisy, masks, sigma, "global", self.config.seed)
            row = self.sieve.measure(f"{name}_noise", noisy, None, None, 32.0, 0.0,
                                     "GPTQ + σ·RMS(W) Gaussian noise")
            self._add(row, f"{name}_noise", self.epsilon, sigma)

    def stochastic_rows(self, layers: dict[str, SievedLayer]) -> None:
        masks = ortho_masks(layers)
        hessians = self.sieve.hessians(self.model)
        for sigma in self.config.stochastic_sigmas:
            spec = StochasticQuantConfig(self.config.bits, self.config.group_size, sigma, self.config.seed)
            sq = stochastic_quantise_model(self.model, spec, masks, {n: hessians[n] for n in masks})
            dual = build_dual_stream_model(self.model, sq)
            stats = stream_stats(dual)
            row = self.sieve.measure("stochastic_quant", dual, 1.0, None, stats["bits_per_weight"],
                                     stats["ortho_density"], "DQC + stochastic quantisation")
            self._add(row, "stochastic_quant", self.epsilon, sigma)

    def run(self) -> list[dict]:
        layers = self.layers()
        self.run_rows(layers)
        self.posthoc_rows(layers)
        self.gptq_rows()
        self.stochastic_rows(layers)
        return self.rows


def to_markdown(rows: list[dict], notes: list[str] = ()) -> str:
    """The table; `audit ε ≥` (next to ε), extraction@k and RMIA columns where the rows have them."""
    audit = any("audit_epsilon_lb" in r for r in rows)
    others = [{k: v for k, v in r.items() if k != "audit_epsilon_lb"} for r in rows]  # the audit sits by ε
    head = ("| kind | α | ε" + (" | audit ε ≥" if audit else "") + " | noise σ | extraction | exposure "
            "| MIA AUC (LOSS) ± SE | MIA AUC (Min-K%++) | TPR@1%FPR (LOSS) | TPR@1%FPR (Min-K%++)"
            + attack_head(others) + " | public PPL | bits/weight |")
    cells = [[r["kind"], format_value(r["alpha"], 2),
              r["epsilon"] if isinstance(r["epsilon"], str) else format_value(float(r["epsilon"]), 2),
              *([format_value(r.get("audit_epsilon_lb"), 2)] if audit else []),
              format_value(r["noise"], 3), format_value(r["extraction_rate"], 2), format_value(r["exposure_mean"], 2),
              format_auc(r), format_value(r.get("mia_auc_minkpp")), format_value(r.get("mia_tpr_at_1pct_fpr_loss")),
              format_value(r.get("mia_tpr_at_1pct_fpr_minkpp")), *attack_cells(o, others),
              format_value(r["public_ppl"]), format_value(r["bits_per_weight"], 2)]
             for r, o in zip(rows, others)]
    return markdown_table(head, cells, notes)
