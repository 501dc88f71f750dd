"""SieveCallback: the kill-switch table of a tiny isolated canary fine-tune, end to end."""
import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from ortho_callbacks.sieve import SieveCallback
from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig, linear_layers
from ortho_train.ortho_linear import ortho_layers
from ortho_train.quantisation import QuantConfig
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve import load_sieved
from ortho_train.sieve.isolation import IsolationConfig
from ortho_train.sieve.core import SieveConfig
from ortho_train.measurement.kill_switch import ROW_KEYS, TableConfig
from tests.secret_scan import holds_secret

REFERENCES = ["fp32", "int4_rtn", "int4_gptq", "nf4", "pre_sft", "int4_pre_sft"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sieve_cb")
    module = CanarySFTModule(
        tiny_llama=TinyLlamaConfig(32, 2, 2, 64), public_steps=3, lr=1e-2, sft_lr=2e-2, warmup_steps=1,
        sft_warmup_steps=1, eval_during_validation=False, val_exposure_references=20,
        isolation=IsolationConfig(support="random", rho=0.05, quant=QuantConfig("gptq", 4, 32),
                                  calibration_batches=2),
    )
    table = TableConfig(references=REFERENCES, alphas=[0.0, 1.0], rhos=[0.05], spec=SieveConfig(QuantConfig("rtn", 4, 32)),
                        metrics=["extraction", "exposure", "mia", "ppl", "rmia", "extraction_at_k", "audit"],
                        exposure_references=10)
    callback = SieveCallback(table=table, calibration_batches=2)
    logger = CSVLogger(tmp, name="cb")
    trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False)
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50)
    trainer.fit(module, datamodule=dm)
    return module, callback, module.run_dir


def test_table_rows_keys_and_variants(run):
    module, callback, run_dir = run
    rows = json.loads((run_dir / "sieve_table.json").read_text())
    assert [r["variant"] for r in rows] == REFERENCES + ["posthoc"] * 2 + ["delta"] * 2 + ["isolated"] * 2
    for row in rows:
        assert set(ROW_KEYS) <= row.keys()
        for key in ("extraction_rate", "exposure_mean", "mia_auc_loss", "public_ppl", "bits_per_weight"):
            assert isinstance(row[key], float), (row["variant"], key)
    by = {(r["variant"], r["alpha"]): r for r in rows}
    assert by[("int4_rtn", None)]["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert by[("nf4", None)]["bits_per_weight"] == 4.5 and by[("fp32", None)]["bits_per_weight"] == 32
    assert by[("isolated", 0.0)]["rho"] == 0.05
    assert by[("isolated", 1.0)]["ortho_density"] == pytest.approx(0.05, abs=0.002)
    # α=0 of the isolated sieve *is* the quantised public model, α=0 of RTN posthoc *is* INT4 RTN
    for key in ("public_ppl", "extraction_rate", "mia_auc_loss", "exposure_mean"):
        assert by[("isolated", 0.0)][key] == by[("int4_pre_sft", None)][key], key
        assert by[("posthoc", 0.0)][key] == by[("int4_rtn", None)][key], key
    # α=0 is the base file alone; α=1 adds 48-bit COO entries
    assert by[("posthoc", 0.0)]["bits_per_weight"] == by[("int4_rtn", None)]["bits_per_weight"]
    assert by[("posthoc", 1.0)]["bits_per_weight"] == pytest.approx(
        5.0 + 48 * by[("posthoc", 1.0)]["ortho_density"])
    md = (run_dir / "sieve_table.md").read_text()
    assert md.startswith("| variant | α | ρ |") and "isolated" in md
    assert callback.markdown == md


def test_logs_and_isolated_artifacts(run, assert_within_path_bound):
    module, callback, run_dir = run
    assert set(callback.tables) == {7}
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "sieve/" not in header  # table rows live in sieve_table.json and TensorBoard runs, not columns
    exact = load_sieved(run_dir / "sieved_isolated", backend="reference")
    deployed = load_sieved(run_dir / "sieved_isolated")  # the CPU fast path
    base_only = load_sieved(run_dir / "sieved_isolated", with_ortho=False)
    ids = torch.tensor([[10, 20, 30, 40]])
    seen = {}  # layer name -> (its input, its output) in the deployed model
    hooks = [layer.register_forward_hook(lambda m, a, y, name=name: seen.__setitem__(name, (a[0], y)))
             for name, layer in ortho_layers(deployed).items()]
    with torch.no_grad():
        trained = module.model.eval()(ids).logits
        reference = exact(ids).logits
        # the saved streams are the trained model up to fp16 ortho values
        assert (reference - trained).abs().max() < 2e-3
        deployed_logits = deployed(ids).logits
        for hook in hooks:
            hook.remove()
        # every deployed layer computes its saved streams' product within its path's derived
        # rounding bound (16-bit fixed-point X in the GEMV, bf16 X/scales/output in torch's op);
        # the whole model's logits have no such bound (errors grow through the layers), so there
        # we assert only that the deployed model carries the ortho streams: it is nearer the
        # reference than the base alone
        assert len(seen) == len(ortho_layers(deployed))
        for name, (x, y) in seen.items():
            layer = ortho_layers(deployed)[name]
            assert layer.bias is None  # the bound is for X·W_eff^T alone
            x2d, y2d = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])  # (B, T, K) -> (B·T, K)
            assert_within_path_bound(y2d, x2d, layer.base(), layer.ortho(), layer.alpha, layer.backend,
                                     name)
        base_gap = (base_only(ids).logits - reference).abs().max()
        assert (deployed_logits - reference).abs().max() < base_gap
        assert sum(m.nnz for m in ortho_layers(base_only).values()) == 0


def test_no_secret_in_table_files(run):
    module, _, run_dir = run
    dm = module.trainer.datamodule
    secrets = [c.secret for c in dm.canaries.members + dm.canaries.holdout]
    for path in run_dir.glob("sieve_table*"):
        text = path.read_text()
        assert not any(holds_secret(text, s, dm.hparams.secret_alphabet) for s in secrets), path.name


def _fit_tiny_isolated(tmp_path, callback, max_steps):
    """A 16-wide one-block isolated run (random support, RTN base, 2 public steps) with `callback`;
    returns the trained module."""
    module = CanarySFTModule(tiny_llama=TinyLlamaConfig(16, 1, 2, 32), public_steps=2, warmup_steps=1,
                             sft_warmup_steps=1, eval_during_validation=False,
                             isolation=IsolationConfig(support="random", rho=0.1,
                                                       quant=QuantConfig("rtn", 4, 16)))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    dm = CanaryDataModule(canary_secrets="seed", seq_len=48, batch_size=2, canary_batch_size=1, val_windows=1, secret_length=3,
                          num_member_canaries=2, num_holdout_canaries=2, num_reference_secrets=10)
    trainer.fit(module, datamodule=dm)
    return module


def test_periodic_tables(tmp_path):
    table = TableConfig(references=["fp32"], variants=["isolated"], alphas=[0.0], metrics=["ppl"],
                        spec=SieveConfig(QuantConfig(group_size=16)))
    callback = SieveCallback(every_n_steps=2, table=table, calibration_batches=1)
    _fit_tiny_isolated(tmp_path, callback, max_steps=5)
    assert set(callback.tables) == {4, 5}  # canary steps 2..4; the last table at fit end
    rows = json.loads((tmp_path / "sieve_table_step4.json").read_text())
    assert [(r["variant"], r["alpha"]) for r in rows] == [("fp32", None), ("isolated", 0.0)]
    assert (tmp_path / "sieve_table.json").is_file() and (tmp_path / "sieve_table_step4.md").is_file()


def test_no_hop_report_unless_asked(run):
    _, _, run_dir = run
    assert not list(run_dir.glob("hop_report*"))


def test_hop_report_and_dqc_rows_beside_plain_gptq(tmp_path):
    table = TableConfig(references=["int4_gptq"], variants=["posthoc", "isolated"], alphas=[0.0, 1.0], rhos=[0.1],
                        metrics=["ppl"], spec=SieveConfig(QuantConfig(group_size=16), hop_beta=1.0), dqc=True,
                        hop_report=True)
    callback = SieveCallback(table=table, calibration_batches=1, save_isolated=False)
    module = _fit_tiny_isolated(tmp_path, callback, max_steps=4)

    rows = json.loads((tmp_path / "sieve_table.json").read_text())
    assert [(r["variant"], r["alpha"]) for r in rows] == [
        ("int4_gptq", None), ("posthoc", 0.0), ("posthoc", 1.0), ("posthoc_dqc", 0.0), ("posthoc_dqc", 1.0),
        ("isolated", 0.0), ("isolated", 1.0)]
    by = {(r["variant"], r["alpha"]): r for r in rows}
    assert "DQC γ=1" in by[("posthoc_dqc", 1.0)]["base"] and "DQC" not in by[("posthoc", 1.0)]["base"]
    assert by[("posthoc_dqc", 0.0)]["public_ppl"] == by[("posthoc", 0.0)]["public_ppl"]  # the same base
    assert by[("posthoc_dqc", 1.0)]["ortho_density"] == by[("posthoc", 1.0)]["ortho_density"]  # same S
    assert "posthoc_dqc" in (tmp_path / "sieve_table.md").read_text()

    report = json.loads((tmp_path / "hop_report.json").read_text())
    assert report["beta"] == 1.0 and report["step"] == 4
    assert [(s["variant"], s["rho"], s["dqc"]) for s in report["sieves"]] == [
        ("posthoc", 0.1, False), ("posthoc_dqc", 0.1, True), ("isolated", 0.1, False)]
    shapes = {name: tuple(m.weight.shape) for name, m in linear_layers(module.model).items()}
    for sieve in report["sieves"]:
        assert set(sieve["layers"]) == set(shapes), sieve["variant"]
        for name, layer in sieve["layers"].items():
            errors = layer["column_errors"]
            assert len(errors) == shapes[name][1], (sieve["variant"], name)  # one entry per input column
            assert sum(errors) == pytest.approx(layer["total_error"], rel=1e-4)
            assert 0 < layer["h_error_alpha0"] <= layer["total_error"] * (1 + 1e-4)  # E_j: damped H
            assert all(errors[j] > layer["tau"] for j in layer["outlier_columns"])
    plain, dqc = report["sieves"][0]["layers"], report["sieves"][1]["layers"]
    for name in shapes:
        assert plain[name]["column_errors"] == dqc[name]["column_errors"]  # DQC leaves the base alone
    # DQC: the α = 1 layer loss folded to its minimum over S (fp16 ortho values: a little slack)
    assert sum(d["h_error_alpha1"] for d in dqc.values()) <= 1.001 * sum(p["h_error_alpha1"] for p in plain.values())


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown reference"):
        TableConfig(references=["int5_rtn"])
    with pytest.raises(ValueError, match="every_n_steps"):
        SieveCallback(every_n_steps=-1)
    with pytest.raises(ValueError, match="variant"):
        TableConfig(variants=["magic"])
    with pytest.raises(ValueError, match=r"alphas must lie in \[0, 1\].*-3\.0, 7\.0"):
        TableConfig(alphas=[-3, 0.5, 7])
    with pytest.raises(ValueError, match=r"rhos .* \(0, 1\), got \[2\.0\]"):
        TableConfig(rhos=[2.0])


def test_attack_columns_on_every_row(run):
    """extraction@k ≥ greedy on every row; RMIA against the pre-canary model with its TPRs unresolved
    at 4 holdouts; the audit's bound; the α = 0 isolated model is the int4_pre_sft model: same numbers."""
    module, _, run_dir = run
    rows = json.loads((run_dir / "sieve_table.json").read_text())
    for row in rows:
        assert row["extraction_at_k"] >= row["extraction_rate"], row["variant"]
        assert 0.0 <= row["mia_auc_rmia"] <= 1.0 and row["mia_auc_rmia_se"] >= 0.0
        assert row["mia_tpr_at_1pct_fpr_rmia"] is None and row["mia_holdout_count"] == 4
        assert row["audit_epsilon_lb"] >= 0.0 and row["audit_canaries"] == 6 and row["audit_delta"] == 1e-5
    by = {(r["variant"], r["alpha"]): r for r in rows}
    for key in ("extraction_at_k", "mia_auc_rmia", "audit_epsilon_lb"):
        assert by[("isolated", 0.0)][key] == by[("int4_pre_sft", None)][key], key
    md = (run_dir / "sieve_table.md").read_text()
    assert "| extraction@k | RMIA AUC ± SE | RMIA TPR@1%FPR | RMIA TPR@0.1%FPR | audit ε ≥ |" in md
    assert "unresolved (n=4)" in md and "Privacy Auditing with One (1) Training Run" in md
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mia_auc_rmia"] == pytest.approx(by[("fp32", None)]["mia_auc_rmia"])
    assert summary["mia_tpr_at_0.1pct_fpr_rmia"] is None and summary["rmia_settings"]["a"] == 0.3


def test_reference_attacks_refused_at_set_up_without_a_pre_canary_model():
    class NoPreCanary:  # a module that keeps no pre-canary model (an unlearning run's, say)
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    table = TableConfig(references=["fp32"], variants=[], metrics=["rmia"])
    with pytest.raises(ValueError, match="table.metrics=.*rmia.*pre-canary model"):
        SieveCallback(table=table).setup(None, NoPreCanary(), "fit")
    SieveCallback(table=TableConfig(references=["fp32"], variants=[], metrics=["extraction_at_k"])).setup(
        None, NoPreCanary(), "fit")  # extraction@k needs no reference


def test_empty_lists_mean_empty_and_no_table_means_default():
    empty = SieveCallback(table=TableConfig(variants=[], references=[]))
    assert empty.config.variants == [] and empty.config.references == []
    default = SieveCallback()
    assert default.config.variants == ["posthoc", "delta", "isolated"]


def test_rows_of_models_the_run_measured_reuse_its_numbers(run):
    """fp32 is the model the final evaluation measured, pre_sft the model whose perplexity was
    taken at the switch: the table shows those numbers (exposure at its own settings)."""
    module, _, run_dir = run
    by = {r["variant"]: r for r in json.loads((run_dir / "sieve_table.json").read_text()) if r["alpha"] is None}
    for key in ("extraction_rate", "holdout_extraction_rate", "mia_auc_loss", "public_ppl"):
        assert by["fp32"][key] == module.final_metrics[key], key
    assert by["pre_sft"]["public_ppl"] == module.public_ppl_before_canaries
    assert by["fp32"]["exposure_mean"] <= math.log2(10) + 1e-9  # the table's 10 references


def test_known_metrics_replace_only_the_groups_they_cover():
    """Sentinel values prove reuse: a fully known model shows them (exposure still measured);
    a model known for its perplexity only is measured for the rest; an unknown one in full."""
    from ortho_train.model_fingerprint import model_fingerprint
    from ortho_train.models import build_tiny_llama
    from ortho_train.measurement.kill_switch import KillSwitchTable

    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, val_windows=2, secret_length=4, num_member_canaries=3,
                          num_holdout_canaries=4, num_reference_secrets=20)
    dm.setup("fit")
    tok = dm.tokenizer
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(tok), tok.pad_token_id, tok.eos_token_id, seed=1)
    pre = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(tok), tok.pad_token_id, tok.eos_token_id, seed=2)
    sentinel = {"extraction_rate": 0.25, "symbol_accuracy": 0.5, "holdout_extraction_rate": 0.75,
                "mia_auc_loss": 0.125, "mia_auc_minkpp": 0.375, "mia_tpr_at_1pct_fpr_loss": 0.0625,
                "mia_tpr_at_1pct_fpr_minkpp": 0.1875, "public_ppl": 123.0, "exposure_mean": 99.0}
    config = TableConfig(variants=[], references=["fp32", "pre_sft"], exposure_references=20, exposure_canaries=1)
    known = {model_fingerprint(model): sentinel, model_fingerprint(pre): {"public_ppl": 456.0}}
    rows = KillSwitchTable(model, pre, dm.probe, config, hessians_of=None, log=lambda _: None, known=known).run()
    fp32, pre_sft = rows
    assert {k: fp32[k] for k in ("extraction_rate", "holdout_extraction_rate", "mia_auc_loss", "public_ppl")} == \
        {"extraction_rate": 0.25, "holdout_extraction_rate": 0.75, "mia_auc_loss": 0.125, "public_ppl": 123.0}
    assert fp32["exposure_mean"] != 99.0 and fp32["exposure_mean"] <= math.log2(20) + 1e-9
    assert pre_sft["public_ppl"] == 456.0 and pre_sft["mia_auc_loss"] not in (None, 0.125)
    unknown = KillSwitchTable(model, pre, dm.probe, config, hessians_of=None, log=lambda _: None).run()[0]
    assert unknown["public_ppl"] != 123.0 and unknown["mia_auc_loss"] != 0.125
