"""`AdapterExportCallback`: save the unlearning result and a metrics card.

In the module's run directory: at train end, before any PTQ copy or table is built, the models
(together: all of them land or none does), then at fit end the card (both files together):
- `adapter/`: the peft adapter (`save_pretrained`: adapter_config.json + safetensors), which
  loads with plain peft into a fresh copy of the base model
  (`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "adapter")`);
- `hf_model_unlearned/`: the model with the adapter merged, as safetensors with its tokenizer
  (always for full-parameter and MANSU runs, which have no adapter; for LoRA if `save_merged`);
- `metrics_card.json` and `metrics_card.md`: method, losses and hyper-parameters, the
  quantisation settings and the PTQ-gap table (from `ptq_gap.json` when `PTQGapCallback` ran),
  the training outcome (steps, retain perplexity, divergence, CAD) and a status: `ok`, `no_change`
  (the forget set's likelihood did not move: the run exits non-zero), `failed`
  (the PTQ gap) or `stopped` (the divergence guard ended training).

If `PTQGapCallback(fail_on_gap=True)` fails the run first, the export still happens (from
`on_exception`), and the card says the run failed. A run stopped before its end (a stop signal or
a full disk, `ortho_train.interruption`) exports its models as they stand, without a card (its
`summary.json` says `status: interrupted`). Secrets are never written to the card.

Reads the module's public attributes: `model`, `tokenizer`, `method_card`, `final_report`, `run_dir`.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ortho_callbacks.ptq_gap import GAP_METRICS, PTQGapError, gap_name
from ortho_train.artifacts import DiskSpaceError, atomic_artifacts, to_json
from ortho_train.model_support import is_peft_model, merged_copy
from ortho_train.models import weight_bytes

STOPS = (SIGTERMException, DiskSpaceError)  # how ortho_train.interruption's runs stop (SIGINT becomes SIGTERM)
TABLE_METRICS = ("forget_extraction", "forget_exposure", "forget_mia_auc_loss", "forget_mia_auc_mink",
                 "forget_verbmem", "forget_privleak", "retain_extraction", "holdout_extraction", "public_ppl")


def ptq_table(results: dict) -> list[dict]:
    """Rows `{metric, before_fp, fp, <variant>…, gap_<variant>…}` from a `ptq_gap.json` dict."""
    variants = results.get("variants", [])
    rows = []
    for metric in TABLE_METRICS:
        if f"{metric}_fp" not in results:
            continue
        row = {"metric": metric, "before_fp": results.get(f"{metric}_fp_before"), "fp": results[f"{metric}_fp"]}
        for variant in variants:
            row[f"before_{variant}"] = results.get(f"{metric}_{variant}_before")
            row[variant] = results.get(f"{metric}_{variant}")
            if metric in GAP_METRICS:
                row[f"gap_{variant}"] = results.get(f"ptq_gap_{gap_name(metric)}_{variant}")
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def card_markdown(card: dict) -> str:
    method = card["method"]
    lines = [f"# Unlearning metrics card: {method['mode']} / {method['loss']}", "",
             f"- status: **{card['status']}**"]
    for key in ("lr", "optimizer", "beta", "retain_weight", "trainable_parameters", "model_path"):
        lines.append(f"- {key}: {method.get(key)}")
    for key in ("lora", "mansu"):
        if key in method:
            lines.append(f"- {key}: `{json.dumps(method[key])}`")
    training = card.get("training", {})
    for key in ("steps", "retain_ppl_start", "retain_ppl_end", "divergence", "cad", "selected_attribution_retained"):
        if key in training:
            lines.append(f"- {key}: {_cell(training[key])}")
    for fmt, settings in card.get("quantisation", {}).items():
        lines.append(f"- quantisation {fmt}: `{json.dumps(settings)}`")
    diag = card.get("weight_diagnostics", {})
    if diag:
        lines.append(f"- bin-crossing fraction: {_cell(diag.get('bin_crossing_fraction'))} "
                     f"(updated weights {diag.get('updated_weights')})")
    rows = card.get("ptq_table", [])
    if rows:
        # one line per model (variant), one column per metric: the PTQ gap reads down a column
        variants = ["fp"] + [c for c in rows[0] if c not in ("metric", "fp", "before_fp")
                             and not c.startswith(("gap_", "before_"))]
        lines += ["", "| model | " + " | ".join(row["metric"] for row in rows) + " | extraction gap |",
                  "|---" * (len(rows) + 2) + "|"]
        for when in ("before", "after"):
            for variant in variants:
                key = variant if when == "after" else f"before_{variant}"
                if all(row.get(key) is None for row in rows):
                    continue
                gap = next((row.get(f"gap_{variant}") for row in rows if row["metric"] == "forget_extraction"), None)
                gap_cell = _cell(gap) if when == "after" and variant != "fp" else ""
                lines.append(f"| {variant} ({when}) | " + " | ".join(_cell(row.get(key)) for row in rows)
                             + f" | {gap_cell} |")
    else:
        lines += ["", "PTQ gap not measured (no PTQGapCallback ran before this export)."]
    return "\n".join(lines) + "\n"


class AdapterExportCallback(L.Callback):
    """Export the adapter (and/or merged model) and a metrics card at the end of fit.

    Args:
        adapter_dirname: directory (in the run dir) for the peft adapter.
        save_merged: also save the LoRA-merged model (non-LoRA runs always save their model).
        merged_dirname: directory for the merged/unlearned model.
        card_name: file stem of the metrics card (.json and .md).
    """

    def __init__(self, adapter_dirname: str = "adapter", save_merged: bool = False,
                 merged_dirname: str = "hf_model_unlearned", card_name: str = "metrics_card"):
        names = {"adapter_dirname": adapter_dirname, "merged_dirname": merged_dirname, "card_name": card_name}
        bad = [f"{key}={value!r}" for key, value in names.items()
               if not value or "/" in value or "\\" in value or value.startswith(".")]
        if bad:
            raise ValueError(f"AdapterExportCallback {', '.join(bad)}: must be a plain, non-hidden name "
                             "of an entry in the run directory")
        if adapter_dirname == merged_dirname:
            raise ValueError(f"AdapterExportCallback adapter_dirname and merged_dirname are both "
                             f"{adapter_dirname!r}: give them different names")
        self.adapter_dirname = adapter_dirname
        self.save_merged = save_merged
        self.merged_dirname = merged_dirname
        self.card_name = card_name
        self.artifacts: dict[str, str] | None = None
        self.card: dict | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        # The model first: tables, PTQ copies and the card come later (`on_fit_end`), so none of
        # their failures can lose it.
        self.export_models(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.export(pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, PTQGapError) and self.card is None:
            self.export(pl_module, failure=str(exception))
        elif isinstance(exception, STOPS) and self.artifacts is None and trainer.global_step > 0:
            try:
                self.export_models(pl_module)
            except OSError as error:  # the stop's own error is the one that ends the run
                rank_zero_warn(f"could not export the stopped run's models to {pl_module.run_dir}: {error}")

    @rank_zero_only
    def export_models(self, pl_module) -> None:
        """The adapter and/or the merged model: all of them land, or none does."""
        is_lora = is_peft_model(pl_module.model)
        wanted = {"adapter": self.adapter_dirname} if is_lora else {}
        if self.save_merged or not is_lora:
            wanted["merged_model"] = self.merged_dirname
        needed = weight_bytes(pl_module.model) if "merged_model" in wanted else 0  # an adapter is small
        with atomic_artifacts(pl_module.run_dir, list(wanted.values()), needed=needed) as staged:
            paths = dict(zip(wanted, staged))
            if "adapter" in paths:
                pl_module.model.save_pretrained(paths["adapter"], safe_serialization=True)
            if "merged_model" in paths:
                merged_copy(pl_module.model).save_pretrained(paths["merged_model"], safe_serialization=True)
                pl_module.tokenizer.save_pretrained(paths["merged_model"])
        self.artifacts = wanted
        rank_zero_info(f"exported {', '.join(wanted.values())} to {pl_module.run_dir}")

    @rank_zero_only
    def export(self, pl_module, failure: str | None = None) -> None:
        """The metrics card (.json and .md, together), after the models if they are not out yet."""
        if self.artifacts is None:
            self.export_models(pl_module)
        run_dir: Path = pl_module.run_dir
        ptq_path = run_dir / "ptq_gap.json"
        results = json.loads(ptq_path.read_text()) if ptq_path.is_file() else {}
        card = {
            "status": _status(pl_module, failure, results),
            "failure": failure,
            "method": pl_module.method_card,
            "training": dict(pl_module.final_report),
            "quantisation": results.get("quantisation", {}),
            "weight_diagnostics": {k: v for k, v in results.items()
                                   if k.startswith(("bin_crossing", "dequantised_change", "updated_weights"))},
            "forgetting_survives": results.get("forgetting_survives"),
            "ptq_table": ptq_table(results),
            "artifacts": dict(self.artifacts),
        }
        with atomic_artifacts(run_dir, [f"{self.card_name}.json", f"{self.card_name}.md"]) as (as_json, as_md):
            as_json.write_text(to_json(card), encoding="utf-8")
            as_md.write_text(card_markdown(card), encoding="utf-8")
        self.card = card
        rank_zero_info(f"wrote {self.card_name}.json/.md to {run_dir} (status {card['status']})")


def _status(pl_module, failure: str | None, results: dict) -> str:
    """'stopped' when the divergence guard ended training, 'no_change' when the forget set's
    likelihood did not move, 'failed' on a PTQ gap, else 'ok'."""
    if getattr(pl_module, "divergence", None):
        return "stopped"
    if getattr(pl_module, "no_change", None):
        return "no_change"
    return "failed" if failure or results.get("status") == "failed" else "ok"
