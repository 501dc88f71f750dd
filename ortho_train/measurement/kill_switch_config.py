"""What the kill-switch table contains (`TableConfig`) and the names of its rows and keys.

Reference rows are named once: `fp32`, `pre_sft`, a registered deployment format (`nf4`, `fp4`),
a base stream `int<k>_<method>` of a registered base quantiser (`registry.int_formats()`:
`int4_rtn`, `int4_gptq`, `int3_rtn`, …) or the pre-fine-tuning model's base stream
`int<k>_pre_sft` (`PRE_SFT_REFERENCES`). Names are looked up in those tables, never parsed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ortho_kernels.packing import SUPPORTED_BITS
from ortho_train.measurement.attacks import ATTACK_METRICS, AttackSettings
from ortho_train.quantisation import base_quantisers, canonical_format, deployment_formats, int_formats
from ortho_train.settings import check_settings
from ortho_train.sieve.core import SieveConfig

MEASURED_KEYS = ("extraction_rate", "exposure_mean", "mia_auc_loss", "public_ppl")  # evaluate_memorisation's
ROW_KEYS = ("variant", "alpha", "rho", *MEASURED_KEYS, "bits_per_weight", "ortho_density")
MIA_EXTRA_KEYS = ("mia_auc_loss_se", "mia_auc_minkpp", "mia_tpr_at_1pct_fpr_loss", "mia_tpr_at_1pct_fpr_minkpp")
ATTACK_KEYS = ("extraction_at_k", "mia_auc_rmia", "mia_auc_rmia_se", "mia_tpr_at_1pct_fpr_rmia",  # AttackSuite's
               "mia_tpr_at_0.1pct_fpr_rmia", "mia_holdout_count", "audit_epsilon_lb", "audit_canaries",
               "audit_guesses", "audit_correct", "audit_delta")
EXTRA_KEYS = ("holdout_extraction_rate", "symbol_accuracy", *MIA_EXTRA_KEYS, "base", "seconds", "peak_rss_mib")
METRICS = ("extraction", "exposure", "mia", "ppl") + ATTACK_METRICS
PRE_SFT_REFERENCES = {f"int{k}_pre_sft": k for k in SUPPORTED_BITS}  # Q(W_pre) at k bits
SIEVED_VARIANTS = ("posthoc", "delta", "isolated", "posthoc_dqc", "delta_dqc")  # rows over α with a ρ
VARIANTS = SIEVED_VARIANTS + ("ogd",)


def int_reference(name: str) -> tuple[int, str] | None:
    """(bits, method or 'pre_sft') of an `int<k>_<method>` / `int<k>_pre_sft` reference, else None."""
    if name in PRE_SFT_REFERENCES:
        return PRE_SFT_REFERENCES[name], "pre_sft"
    method_bits = int_formats().get(name)
    return None if method_bits is None else (method_bits[1], method_bits[0])


@dataclass
class TableConfig:
    """What the kill-switch table contains and how it is measured (`SieveCallback(table=…)`).

    Args:
        variants: sieves to run: posthoc, delta, isolated, ogd (the α-models of an OGD fine-tune),
            posthoc_dqc, delta_dqc (posthoc / delta with DQC-compensated ortho values).
        references: reference rows: fp32, int4_rtn, int4_gptq, nf4, fp4, pre_sft, int4_pre_sft
            (any int{2,3,4,8}_{rtn,gptq,pre_sft}, any registered deployment format).
        alphas: α values evaluated for each sieve, in [0, 1].
        rhos: ortho fractions of the posthoc and delta sieves (isolated: its training ρ).
        spec: the posthoc/delta sieve (base quantiser, bits, group size, selection, DQC γ, HOP β,
            LM head); the int references use its quantiser settings too.
        metrics: subset of extraction, exposure, mia, ppl, rmia (offline RMIA against the
            pre-fine-tuning model), extraction_at_k (sampled extraction), audit (the one-run lower
            bound on ε, `ortho_train.measurement.attacks`).
        attacks: settings of rmia, extraction_at_k and audit (`AttackSettings`).
        exposure_references: reference secrets for exposure (fewer = faster; None: all).
        exposure_canaries: members whose exposure is measured (None: all).
        dqc: add a posthoc_dqc / delta_dqc row right after every posthoc / delta row.
        hop_report: record the HOP per-column report of every sieve (hop_report.json).

    A setting that would be ignored is refused: `spec.dqc_gamma` without DQC rows, `spec.hop_beta`
    without `hop_report`, `hop_report` without a sieved variant.
    """

    variants: list[str] = field(default_factory=lambda: ["posthoc", "delta", "isolated"])
    references: list[str] = field(default_factory=lambda: ["fp32", "int4_rtn", "int4_gptq", "nf4",
                                                           "pre_sft", "int4_pre_sft"])
    alphas: list[float] = field(default_factory=lambda: [0.0, 1.0])
    rhos: list[float] = field(default_factory=lambda: [0.01])
    spec: SieveConfig = field(default_factory=SieveConfig)
    metrics: list[str] = field(default_factory=lambda: ["extraction", "exposure", "mia", "ppl"])
    exposure_references: int | None = 1000
    exposure_canaries: int | None = None
    dqc: bool = False
    hop_report: bool = False
    attacks: AttackSettings = field(default_factory=AttackSettings)

    def __post_init__(self) -> None:
        self.alphas, self.rhos = [float(a) for a in self.alphas], [float(r) for r in self.rhos]
        if self.dqc:
            self.variants = with_dqc_twins(self.variants)
        self._check_entries()
        self._check_nothing_ignored()

    def _check_entries(self) -> None:
        for name in self.references:
            canonical_format(name)  # an old spelling is refused with its canonical one
            if name not in ("fp32", "pre_sft") + deployment_formats() and int_reference(name) is None:
                raise ValueError(f"unknown reference {name!r}: use fp32, pre_sft, a deployment format "
                                 f"{deployment_formats()} or int{{k}}_{{method or pre_sft}} (k in "
                                 f"{SUPPORTED_BITS}, methods {base_quantisers()})")
        for variant in self.variants:
            if variant not in VARIANTS:
                raise ValueError(f"unknown sieve variant {variant!r}: use one of {VARIANTS}")
        check_settings("table", [
            ("alphas", self.alphas, bool(self.alphas), "needs at least one α (0: base stream only, 1: the full "
             "ortho stream); without any the table has no kill-switch rows"),
            ("rhos", self.rhos, bool(self.rhos) or set(self.variants) <= {"isolated", "ogd"},
             "needs at least one ortho fraction for the posthoc and delta sieves"),
        ])
        bad_alphas = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if bad_alphas:
            raise ValueError(f"alphas must lie in [0, 1] (0: base stream only, 1: the full ortho stream), "
                             f"got {bad_alphas}")
        bad_rhos = [r for r in self.rhos if not 0.0 < r < 1.0]
        if bad_rhos:
            raise ValueError(f"rhos (ortho fractions) must lie in (0, 1), got {bad_rhos}")
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise ValueError(f"metrics must be a non-empty subset of {', '.join(METRICS)}; got {self.metrics}")
        for name in ("exposure_references", "exposure_canaries"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 (or None: all), got {value}")

    def _check_nothing_ignored(self) -> None:
        defaults = SieveConfig()
        if self.spec.dqc_gamma != defaults.dqc_gamma and not any(v.endswith("_dqc") for v in self.variants):
            raise ValueError("spec.dqc_gamma needs DQC rows (dqc: true, or posthoc_dqc / delta_dqc in "
                             "variants); it would be ignored")
        if self.spec.hop_beta != defaults.hop_beta and not self.hop_report:
            raise ValueError("spec.hop_beta needs hop_report: true (it would be ignored)")
        if self.hop_report and not set(self.variants) & set(SIEVED_VARIANTS):
            raise ValueError(f"hop_report needs a sieved variant ({', '.join(SIEVED_VARIANTS)}) in variants, "
                             f"got {self.variants}")


def with_dqc_twins(variants: list[str]) -> list[str]:
    """`variants` with `<v>_dqc` right after each posthoc / delta (each variant once)."""
    if not {"posthoc", "delta"} & set(variants):
        raise ValueError(f"dqc: true adds posthoc_dqc / delta_dqc rows beside posthoc / delta, but "
                         f"variants {variants} has neither")
    twinned = [v for plain in variants for v in ((plain, f"{plain}_dqc") if plain in ("posthoc", "delta") else (plain,))]
    return list(dict.fromkeys(twinned))  # a _dqc variant listed as well: once
