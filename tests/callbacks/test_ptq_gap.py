"""PTQGapCallback on a tiny memorised model, with outcomes known by construction.

- "Quantisation undoes unlearning": gradient ascent with every quantised weight clamped inside
  the NF4 rounding interval of its starting value (and block maxima fixed) forgets in full
  precision, yet its NF4 copy is bit-for-bit the NF4 copy of the starting model — so NF4
  extraction must equal the starting model's, no quantised value changed, and `fail_on_gap`
  must fail the run after writing `ptq_gap.json`.
- "Forgetting survives": MANSU moves every updated weight by at least one NF4 bin, so the
  bin-crossing fraction is 1 and quantisation cannot round the update away.
"""
import json

import lightning as L
import pytest
import torch

from ortho_callbacks.adapter_export import AdapterExportCallback
from ortho_callbacks.ptq_gap import PTQGapCallback, PTQGapError
from ortho_train import quantisation as quant
from ortho_train.evaluation import evaluate_unlearning
from ortho_train.quantisation.bins import level_widths
from ortho_train.quantisation.bnb4 import code_levels
from ortho_train.unlearn_module import UnlearnModule
from ortho_train.unlearning.mansu import MansuConfig
from tests.tensorboard_rows import row_runs
from tests.ortho_train.unlearn_helpers import cached_tiny_canary_model, single_thread, tiny_datamodule  # noqa: F401

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_tiny_canary_model(tmp_path_factory)


class StayInNF4Bins(L.Callback):
    """After each step, clamp every quantised weight into its starting NF4 rounding interval."""

    def on_train_start(self, trainer, module):
        mids, _ = level_widths(code_levels("nf4"))
        lower, upper = torch.cat([torch.tensor([-1.0]), mids]), torch.cat([mids, torch.tensor([1.0])])
        self.bounds = {}
        for name, linear in quant.quantisable_linears(module.model).items():
            blocks = linear.weight.detach().reshape(-1, 64)  # (n_blocks, 64)
            absmax = blocks.abs().amax(dim=1, keepdim=True)
            level = torch.bucketize((blocks / absmax).contiguous(), mids)
            lo, hi = lower[level] * absmax, upper[level] * absmax
            lo, hi = lo + 0.01 * (hi - lo), hi - 0.01 * (hi - lo)  # stay strictly inside
            fixed = blocks.abs() == absmax  # moving a block maximum would rescale the block
            self.bounds[name] = (torch.where(fixed, blocks, lo).view_as(linear.weight),
                                 torch.where(fixed, blocks, hi).view_as(linear.weight))

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for name, linear in quant.quantisable_linears(module.model).items():
            lo, hi = self.bounds[name]
            linear.weight.copy_(torch.maximum(torch.minimum(linear.weight, hi), lo))


def _trainer(tmp_path, steps, callbacks):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks)


def test_gap_detected_and_run_failed_when_quantisation_undoes_unlearning(model_dir, tmp_path):
    module = UnlearnModule(str(model_dir), mode="full", loss="ga", lr=3e-3, guard_every_n_steps=0,
                           attribution_batches=0)
    for name, param in module.model.named_parameters():  # only what NF4 quantises may move
        param.requires_grad_(name.rsplit(".", 2)[-2] in LINEARS)
    ptq_callback = PTQGapCallback(formats=["nf4"], exposure_references=50, final_exposure_references=50,
                                  fail_on_gap=True)
    export = AdapterExportCallback()
    dm = tiny_datamodule(model_dir)
    with pytest.raises(PTQGapError, match=r"forget extraction gap nf4 \+1.000"):
        _trainer(tmp_path, 20, [StayInNF4Bins(), ptq_callback, export]).fit(module, datamodule=dm)
    results = json.loads((tmp_path / "ptq_gap.json").read_text())
    assert results["forget_extraction_fp_before"] == 1.0 == results["forget_extraction_nf4_before"]
    assert results["forget_extraction_fp"] == 0.0  # forgotten in full precision…
    assert results["forget_extraction_nf4"] == 1.0  # …and back after NF4
    assert results["ptq_gap_extraction_nf4"] == 1.0
    assert results["dequantised_change_fraction_nf4"] == 0.0 and results["updated_weights"] > 0
    assert 0 < results["bin_crossing_fraction"] < 1  # moves within a bin can still exceed half of it
    assert results["public_ppl_nf4"] == pytest.approx(results["public_ppl_nf4_before"], rel=1e-6)
    assert results["forgetting_survives"] is False and results["status"] == "failed"
    # the callback's numbers are evaluate_unlearning's on an independent NF4 copy
    independent = evaluate_unlearning(quant.quantised_copy(module.model, "nf4", quant.PTQConfig()),
                                      dm.forget_probe, dm.retain_members, exposure_references=50)
    for key in ("forget_extraction", "forget_exposure", "forget_mia_auc_loss", "public_ppl"):
        assert results[f"{key}_nf4"] == pytest.approx(independent[key], rel=1e-6), key
    # the export still happened, and its card says the run failed
    card = json.loads((tmp_path / "metrics_card.json").read_text())
    assert card["status"] == "failed" and "does not survive" in card["failure"]
    assert (tmp_path / "hf_model_unlearned" / "model.safetensors").is_file()


def test_mansu_update_crosses_every_bin_and_survives(model_dir, tmp_path):
    settings = MansuConfig(component_fraction=0.05, retain_sequences=6, fisher_budget=0.5)
    module = UnlearnModule(str(model_dir), mode="mansu", loss="npo", optimizer="sgd", lr=1e-2, mansu=settings,
                           guard_every_n_steps=0)
    callback = PTQGapCallback(formats=["nf4", "fp4"], exposure_references=50, final_exposure_references=50,
                              evaluate_before=False, fail_on_gap=True)
    _trainer(tmp_path, 10, [callback]).fit(module, datamodule=tiny_datamodule(model_dir))
    results = callback.results
    assert results["bin_crossing_fraction_nf4"] == 1.0
    assert results["updated_weights"] == module.mansu_plan.theta0.numel()
    assert results["dequantised_change_fraction_nf4"] > 0.9
    assert results["forgetting_survives"] is True and results["status"] == "ok"
    assert results["ptq_gap_extraction_nf4"] <= 0.05 and results["ptq_gap_extraction_fp4"] <= 0.05
    assert "forget_extraction_nf4_before" not in results


def test_periodic_evaluation_writes_and_logs_lora_deployments(model_dir, tmp_path):
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo", lr=1e-3, guard_every_n_steps=0,
                           attribution_batches=0)
    callback = PTQGapCallback(formats=["nf4"], every_n_steps=2, periodic_metrics=["extraction"],
                              exposure_references=20, final_exposure_references=20, evaluate_before=False)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="ptq", version=0)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, datamodule=tiny_datamodule(model_dir))
    run_dir = module.run_dir
    # step 2 periodic (its own file); step 4 is the last step: the final measurement, ptq_gap.json
    assert sorted(p.name for p in run_dir.glob("ptq_gap_step*.json")) == ["ptq_gap_step2.json"]
    periodic = json.loads((run_dir / "ptq_gap_step2.json").read_text())
    assert {"forget_extraction_fp", "ptq_gap_extraction_nf4", "ptq_gap_extraction_nf4_adapter"} <= periodic.keys()
    assert not any("exposure" in key or "mia" in key for key in periodic)  # periodic_metrics: extraction only
    assert "forget_exposure_nf4_adapter" in callback.results  # the final measurement has every metric
    assert callback.results["variants"] == ["nf4", "nf4_adapter"]
    # TensorBoard: one run per deployment, its identity as hparams, tags without the deployment
    rows = row_runs(run_dir, "ptq")
    assert set(rows) == {"fp", "nf4", "nf4_adapter"}
    adapter = rows["nf4_adapter"]
    assert adapter["hparams"] == {"deployment": "nf4_adapter", "format": "nf4", "lora": "adapter"}
    steps = adapter["scalars"]["ptq/forget_extraction"]
    assert [step for step, _ in steps] == [2, 4]
    assert steps[0][1] == pytest.approx(periodic["forget_extraction_nf4_adapter"])
    assert steps[1][1] == pytest.approx(callback.results["forget_extraction_nf4_adapter"])
    assert rows["nf4"]["scalars"]["ptq/ptq_gap_extraction"][-1][1] == pytest.approx(
        callback.results["ptq_gap_extraction_nf4"])


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown quantisation formats"):
        PTQGapCallback(formats=["nf3"])
    with pytest.raises(ValueError, match="lora_deployments"):
        PTQGapCallback(lora_deployments=["fused"])
    with pytest.raises(ValueError, match="periodic_metrics"):
        PTQGapCallback(periodic_metrics=["accuracy"])
    with pytest.raises(ValueError, match="compute_dtype"):
        PTQGapCallback(quant=quant.PTQConfig(compute_dtype="float8"))


def test_privleak_against_a_real_reference_and_refused_without_one(model_dir, tmp_path):
    from ortho_train.metrics import privleak
    from ortho_train.models import load_causal_lm
    from tests.ortho_train.unlearn_helpers import TINY
    from ortho_train.models import build_tiny_llama

    never_saw = build_tiny_llama(TINY, 259, 0, 1, seed=5)  # a model that never saw the forget set
    never_saw.save_pretrained(tmp_path / "reference")
    with_ref = PTQGapCallback(formats=["nf4"], exposure_references=20, final_exposure_references=20,
                              skewnorm_references=20, evaluate_before=False,
                              privleak_reference=str(tmp_path / "reference"))
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo", guard_every_n_steps=0)
    _trainer(tmp_path / "a", 1, [with_ref]).fit(module, datamodule=tiny_datamodule(model_dir))
    results = with_ref.results
    auc_ref = evaluate_unlearning(load_causal_lm(tmp_path / "reference"), module.forget_probe,
                                  include=("mia",))["forget_mia_auc_mink_40"]
    assert results["privleak_reference"]["forget_mia_auc_mink_40"] == pytest.approx(auc_ref)
    for variant in ("fp", "nf4", "nf4_adapter"):  # nf4: merged, then quantised
        assert results[f"forget_privleak_{variant}"] == pytest.approx(
            privleak(results[f"forget_mia_auc_mink_40_{variant}"], auc_ref)), variant
    # 'auto' next to a model directory without hf_model_pre_canary: refused, never a silent 0.5
    auto = PTQGapCallback(formats=["nf4"], exposure_references=20, final_exposure_references=20,
                          skewnorm_references=20, evaluate_before=False)
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo", guard_every_n_steps=0)
    _trainer(tmp_path / "b", 1, [auto]).fit(module, datamodule=tiny_datamodule(model_dir))
    assert "hf_model_pre_canary" in auto.results["privleak_refused"]
    assert not any(key.startswith("forget_privleak") for key in auto.results)


def test_extraction_at_k_and_rmia_in_every_deployment(model_dir, tmp_path):
    """Before and at the end, each deployment gets extraction@k (≥ its greedy extraction) and RMIA
    forget vs holdout against the reference directory, equal to the suite measured by hand."""
    from ortho_train.measurement.attacks import AttackSettings, AttackSuite
    from ortho_train.metrics.sampled_extraction import SampledExtractionConfig
    from ortho_train.models import build_tiny_llama, load_causal_lm
    from tests.ortho_train.unlearn_helpers import TINY

    build_tiny_llama(TINY, 259, 0, 1, seed=5).save_pretrained(tmp_path / "reference")
    attacks = AttackSettings(sampled_extraction=SampledExtractionConfig(k=4))
    callback = PTQGapCallback(formats=["nf4"], exposure_references=20, final_exposure_references=20,
                              skewnorm_references=20, privleak_reference=None, attack_metrics=["extraction_at_k", "rmia"],
                              attacks=attacks, rmia_reference=str(tmp_path / "reference"))
    module = UnlearnModule(str(model_dir), mode="full", loss="ga", lr=1e-4, guard_every_n_steps=0)
    _trainer(tmp_path / "run", 1, [callback]).fit(module, datamodule=tiny_datamodule(model_dir))
    results = callback.results
    for variant in ("fp", "nf4"):
        for when in ("", "_before"):
            at_k, greedy = results[f"forget_extraction_at_k_{variant}{when}"], results[f"forget_extraction_{variant}{when}"]
            assert at_k >= greedy, (variant, when)
            assert 0.0 <= results[f"forget_mia_auc_rmia_{variant}{when}"] <= 1.0
    assert results["ptq_gap_extraction_at_k_nf4"] == pytest.approx(
        results["forget_extraction_at_k_nf4"] - results["forget_extraction_at_k_fp"])
    suite = AttackSuite(module.forget_probe, ["rmia"], attacks, load_causal_lm(tmp_path / "reference"))
    assert results["forget_mia_auc_rmia_fp"] == pytest.approx(suite.measure(module.model)["mia_auc_rmia"])


def test_rmia_without_its_reference_model_is_refused_at_start_up(model_dir, tmp_path):
    callback = PTQGapCallback(formats=["nf4"], attack_metrics=["rmia"], rmia_reference="pre_canary")
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo", guard_every_n_steps=0)
    with pytest.raises(ValueError, match="rmia_reference='pre_canary': no model directory"):
        _trainer(tmp_path, 1, [callback]).fit(module, datamodule=tiny_datamodule(model_dir))
    with pytest.raises(ValueError, match="attack_metrics"):
        PTQGapCallback(attack_metrics=["audit"])


def test_every_ddp_rank_fails_with_rank_zeros_gap(monkeypatch):
    """Only rank 0 measures; a rank > 0 learns the failure by broadcast and raises too (a rank
    that exited 0 would let a launcher report success)."""
    import ortho_train.distributed as distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    sent = []

    class Strategy:
        @staticmethod
        def broadcast(obj, src=0):
            sent.append(obj)
            return "forget extraction gap 0.40 > 0.05 (nf4)"  # what rank 0 found

    class Rank1Trainer:
        is_global_zero = False
        strategy = Strategy()

    callback = PTQGapCallback(fail_on_gap=True, privleak_reference=None)
    with pytest.raises(PTQGapError, match="gap 0.40"):
        callback.on_fit_end(Rank1Trainer(), pl_module=None)
    assert sent == [None]  # rank 1 measured nothing itself


def test_every_deployment_stores_its_roc_and_the_report_draws_them(model_dir, tmp_path):
    """Each deployment (fp, nf4 merged, nf4 + fp adapter) and the start model store the LOSS attack's
    ROC rates forget vs holdout; their area is the stored AUC; the report draws one panel each."""
    import numpy as np

    from ortho_train.report import build_report
    from ortho_train.report.roc import START, ptq_gap_curves
    from tests.ortho_train.test_report import section_status
    from tests.ortho_train.test_report_sections import figures_in

    callback = PTQGapCallback(formats=["nf4"], exposure_references=20, final_exposure_references=20,
                              skewnorm_references=20, privleak_reference=None)
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo", guard_every_n_steps=0)
    _trainer(tmp_path, 1, [callback]).fit(module, datamodule=tiny_datamodule(model_dir))
    results = json.loads((module.run_dir / "ptq_gap.json").read_text())
    for name in ("fp", "nf4", "nf4_adapter", "fp_before"):
        curve = results[f"forget_mia_roc_loss_{name}"]
        assert curve["fpr"][0] == curve["tpr"][0] == 0.0 and curve["fpr"][-1] == curve["tpr"][-1] == 1.0
        # the area under the stored rates (ties drawn as diagonals) is the AUC of the same scores
        area = float(np.trapezoid(curve["tpr"], curve["fpr"]))
        assert area == pytest.approx(results[f"forget_mia_auc_loss_{name}"], abs=1e-4), name
    assert [label for label, _, _ in ptq_gap_curves(results)] == ["fp", "nf4", "nf4_adapter", START]
    page = build_report([module.run_dir], tmp_path / "report.html").read_text()
    assert section_status(page)["deployments_roc"] == "present" and figures_in(page, "deployments_roc") == 1
