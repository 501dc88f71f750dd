"""The attack columns (extraction@k, RMIA AUC ± SE and TPRs, the audit's ε lower bound) in the report's
kill-switch, privacy and PTQ-gap tables, and the PTQ gap's ROC per deployment, on the fixture runs'
files (`report_fixtures`: the callbacks' exact keys); a missing value is "–", never a crash. The
whole reports of the same runs show them too (`test_report_sections`)."""
import json

import pytest

from ortho_train.report.attacks import attack_columns, auc_cell, deployment_row, tpr_cell, tpr_keys
from ortho_train.report.kill_switch import table_rows as kill_switch_table
from ortho_train.report.privacy import audit_key, privacy_table
from ortho_train.report.roc import START, deployments_figure, ptq_gap_curves
from ortho_train.report.unlearning import gap_table
from tests.ortho_train.report_fixtures import write_dp_run, write_ogd_run, write_unlearn_run

UNRESOLVED = "unresolved (n=200)"  # 200 holdouts · 0.1% = 0.2 < 1 false positive: no TPR at 0.1% FPR


def by_first_cell(table) -> dict[str, list[str]]:
    """`{first cell: the row's cells}` (the first row of each name); the header under "header"."""
    rows = {"header": table.header}
    for cells in table.rows:
        rows.setdefault(cells[0], cells)
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_attacks")
    return {"dp": json.loads((write_dp_run(root) / "dp_table.json").read_text()),
            "ogd": json.loads((write_ogd_run(root) / "sieve_table.json").read_text()),
            "unlearn": json.loads((write_unlearn_run(root) / "ptq_gap.json").read_text())}


def test_cells_by_hand():
    row = {"mia_auc_rmia": 0.91234, "mia_auc_rmia_se": 0.0456, "mia_tpr_at_0.1pct_fpr_rmia": None,
           "mia_tpr_at_1pct_fpr_rmia": 0.25, "mia_tpr_at_10pct_fpr_rmia": 0.5, "mia_holdout_count": 200}
    assert auc_cell(row) == "0.912 ± 0.046"
    assert auc_cell({"mia_auc_rmia": 0.5}) == "0.500" and auc_cell({"mia_auc_rmia_se": 0.1}) == "–"
    assert tpr_cell(row, "mia_tpr_at_0.1pct_fpr_rmia") == UNRESOLVED
    assert tpr_cell({"mia_tpr_at_0.1pct_fpr_rmia": None}, "mia_tpr_at_0.1pct_fpr_rmia") == "–"  # no count
    assert tpr_cell(row, "mia_tpr_at_5pct_fpr_rmia") == "–"
    assert tpr_keys(row) == ["mia_tpr_at_10pct_fpr_rmia", "mia_tpr_at_1pct_fpr_rmia", "mia_tpr_at_0.1pct_fpr_rmia"]
    columns = attack_columns([row, {"extraction_at_k": "n/a", "audit_epsilon_lb": 1.8226}])
    assert [c.header for c in columns] == ["extraction@k", "RMIA AUC ± SE", "RMIA TPR@10%FPR", "RMIA TPR@1%FPR",
                                           "RMIA TPR@0.1%FPR", "audit ε ≥"]
    assert [c.cell({"extraction_at_k": "n/a", "audit_epsilon_lb": 1.8226}) for c in columns] == \
        ["–", "–", "–", "–", "–", "1.82"]
    assert attack_columns([{"extraction_rate": 1.0}]) == []
    flat = {"forget_extraction_at_k_nf4": 0.25, "forget_extraction_at_k_nf4_adapter": 0.5, "public_ppl_nf4": 9.0}
    assert deployment_row(flat, "nf4") == {"extraction_at_k": 0.25}


def test_kill_switch_rows_show_the_attacks(files):
    table = kill_switch_table(files["ogd"])
    rows = by_first_cell(table)
    header = rows["header"]
    assert header[-6:] == ["extraction@k", "RMIA AUC ± SE", "RMIA TPR@1%FPR", "RMIA TPR@0.1%FPR", "audit ε ≥",
                           "base"]
    assert rows["fp32"][-6:-1] == ["–"] * 5  # no attack measured on fp32
    # pre_sft (200 holdouts): extraction 0 → @k 0.00, AUC 0.520 ± 0.050, TPR@0.1% unresolved, audit 1.82 · 0
    assert rows["pre_sft"][-6:-1] == ["0.00", "0.520 ± 0.050", "0.250", UNRESOLVED, "0.00"]
    # ogd α=1 (2,000 holdouts): extraction 0.5 → @k 0.50, AUC 0.5 + 0.4 = 0.900 ± 0.050, TPRs 0.250 / 0.100,
    # audit 1.82 · 1; α = ½: AUC 0.700, unresolved, audit 0.91
    ogd = {cells[1]: cells[-6:-1] for cells in table.rows if cells[0] == "ogd"}
    assert ogd["1.00"] == ["0.50", "0.900 ± 0.050", "0.250", "0.100", "1.82"]
    assert ogd["0.50"] == ["0.25", "0.700 ± 0.050", "0.250", UNRESOLVED, "0.91"]


def test_privacy_table_shows_the_attacks_and_the_audit_beside_epsilon(files):
    assert audit_key(files["dp"]) == "audit_epsilon_lb"
    rows = by_first_cell(privacy_table(files["dp"], audit_key(files["dp"])))
    assert rows["header"][:3] == ["row", "ε", "audit ε ≥"]
    assert rows["header"][8:12] == ["extraction@k", "RMIA AUC ± SE", "RMIA TPR@1%FPR", "RMIA TPR@0.1%FPR"]
    # run α=1: ε 7.99, audit 0.40; extraction@k 0.5 · 1, RMIA AUC 0.49 ± 0.05
    assert rows["run α=1"][:3] == ["run α=1", "7.99", "0.40"]
    assert rows["run α=1"][8:12] == ["0.50", "0.490 ± 0.050", "0.250", UNRESOLVED]
    assert rows["run α=0"][2] == "–" and rows["run α=0"][8] == "0.00"
    assert rows["stochastic_quant σ=1"][8:12] == ["–"] * 4  # no attack on that row
    assert rows["stochastic_quant σ=1"][12] == "29.000"  # the columns after the attacks stay in place


def test_ptq_gap_rows_show_the_forget_attacks(files):
    rows = by_first_cell(gap_table(files["unlearn"]))
    assert rows["header"] == ["metric", "fp before", "fp", "nf4", "int4_rtn"]
    assert rows["forget extraction@k"] == ["forget extraction@k", "1.00", "0.00", "0.25", "–"]
    assert rows["forget RMIA AUC ± SE"][1:] == ["1.000 ± 0.050", "0.600 ± 0.050", "0.600 ± 0.050", "–"]
    assert rows["forget RMIA TPR@0.1%FPR"][1:] == [UNRESOLVED, UNRESOLVED, UNRESOLVED, "–"]
    assert "forget audit ε ≥" not in rows  # the PTQ gap does not audit


def test_unlearning_run_draws_the_roc_of_every_deployment(files):
    labels = [label for label, _, _ in ptq_gap_curves(files["unlearn"])]
    assert labels == ["fp", "nf4", "int4_rtn", START]
    results = {"variants": ["nf4", "int4_rtn"], "forget_mia_auc_loss_fp": 0.6,
               "forget_mia_roc_loss_fp": {"fpr": [0.0, 1.0], "tpr": [0.5, 1.0]},
               "forget_mia_roc_loss_nf4": {"fpr": [0.0, 1.0], "tpr": [0.25, 1.0]},
               "forget_mia_roc_loss_int4_rtn": {"fpr": [0.0], "tpr": [0.0, 1.0]},  # malformed: left out
               "forget_mia_roc_loss_fp_before": {"fpr": [0.0, 1.0], "tpr": [1.0, 1.0]}}
    curves = ptq_gap_curves(results)
    assert [(label, auc) for label, _, auc in curves] == [("fp", 0.6), ("nf4", None), (START, None)]
    fig = deployments_figure(curves, reference_label="fp")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split("  ")[0] for ax in panels] == ["fp", "nf4", START]
    # one labelled curve per panel, the faint fp curve beside every other deployment's
    assert [[line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
            for ax in panels] == [["fp"], ["fp", "nf4"], ["fp", START]]
