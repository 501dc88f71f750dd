"""The final evaluation of a canary SFT run: `summary.json` and the report's plot data.

`write_run_summary(module)` evaluates the trained model once with every reference secret
(`ortho_train.evaluation.evaluate_memorisation`) and writes, in the run directory:
- `summary.json`: the headline keys first (`SUMMARY_KEYS`), then every other metric (with the
  offline RMIA against the pre-canary model, `ortho_train.attack_evaluation.rmia_summary`), the
  canary-phase settings, the private-update controller's entry and the canary record (a
  fingerprint, no secret);
- `roc.json`: the MIA ROC rates (no scores, no texts), from the same forward passes as the
  summary's MIA numbers;
- `exposure_refs.json`: the histogram of reference log-perplexities with its skew-normal fit,
  pooled from the skew-normal exposure's own scores of the first members' contexts.

`write_interrupted_summary(module, record)` writes the `summary.json` of a run stopped before its
end: the interruption record (`status: interrupted`, the step, the checkpoint and the command that
resumes it) and the canary record, no metrics.
"""
from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from ortho_train.artifacts import write_json_atomic
from ortho_train.attack_evaluation import rmia_summary
from ortho_train.evaluation import (SCORED_TOKENS, canary_scores, evaluate_memorisation, exposure_histogram,
                                    exposure_reference_histogram, mia_roc_curves)
from ortho_train.progress_lines import phase

HISTOGRAM_CONTEXTS, HISTOGRAM_REFERENCES = 5, 1000  # the exposure histogram: first 5 members × 1,000 references
SUMMARY_KEYS = (
    "extraction_rate", "holdout_extraction_rate", "exposure_mean", "public_ppl",
    "public_ppl_before_canaries", "mia_auc_loss", "mia_auc_loss_se", "mia_auc_mink", "mia_auc_minkpp", "mia_auc_zlib",
    "mia_auc_rmia", "mia_auc_rmia_se",  # its TPRs follow among the other keys (null where unresolved)
)


def write_run_summary(module) -> dict:
    """Evaluate `module.model` on its probe, log `final/*` and write the files above.

    `module` is a `CanarySFTModule` at the end of fit (its trainer, datamodule, loggers and
    private-update controller attached). Returns the evaluated metrics.
    """
    model, probe, trainer = module.model, module.probe, module.trainer
    fits: list = []  # (Px(member), Px(first 1,000 references)) per member: the histogram's contexts
    with phase("final memorisation evaluation (all reference secrets)"):
        scores = canary_scores(model, probe) if len(probe.holdout) else None  # MIA numbers and ROC curves
        found = evaluate_memorisation(model, probe, progress=True, scores=scores, fit_scores=fits,
                                      skewnorm_references=HISTOGRAM_REFERENCES)
    with phase("final reference-model MIA (offline RMIA against the pre-canary model)"):
        found |= rmia_summary(model, getattr(module, "pre_canary_state_dict", None), probe, scores)
    found["public_ppl_before_canaries"] = module.public_ppl_before_canaries
    found["scored_tokens"] = SCORED_TOKENS
    found["canary_steps"] = trainer.max_steps - module.hparams.public_steps
    found.update(module.private_update.summary_entries())
    found["canary_presentations_per_member"] = (
        found["canary_steps"] * trainer.datamodule.hparams.canary_batch_size
        * max(1, trainer.world_size) / len(probe.members)
    )
    found |= trainer.datamodule.canary_record  # later stages check they use these canaries
    for logger in module.loggers:
        logger.log_metrics({f"final/{k}": v for k, v in found.items() if isinstance(v, (int, float))},
                           step=module.global_step)
        logger.save()
    summary = {key: found.get(key) for key in SUMMARY_KEYS} | {k: v for k, v in found.items() if k not in SUMMARY_KEYS}
    path = write_json_atomic(module.run_dir / "summary.json", summary)
    rank_zero_info(f"summary written to {path.resolve()}")
    roc = mia_roc_curves(model, probe, scores=scores)
    if roc:
        write_json_atomic(module.run_dir / "roc.json", roc)
    contexts = min(HISTOGRAM_CONTEXTS, len(probe.members))  # fewer fits: the fit was refused early
    histogram = (exposure_histogram(fits[:contexts]) if len(fits) >= contexts
                 else exposure_reference_histogram(model, probe, HISTOGRAM_CONTEXTS, HISTOGRAM_REFERENCES))
    write_json_atomic(module.run_dir / "exposure_refs.json", histogram)
    return found


def write_interrupted_summary(module, record: dict) -> None:
    """`summary.json` of a run stopped before its end: `record` and the canary record, no metrics
    (later stages read the status and refuse the unfinished model)."""
    summary = record | {"public_ppl_before_canaries": module.public_ppl_before_canaries}
    summary |= module.trainer.datamodule.canary_record
    path = write_json_atomic(module.run_dir / "summary.json", summary)
    rank_zero_info(f"summary (status {record['status']}) written to {path.resolve()}")
