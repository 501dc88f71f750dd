"""SeparationTableCallback: the rows and columns of a tiny dense and a tiny OGD run."""
import json

import pytest

from ortho_callbacks.separation import SeparationTableCallback
from ortho_train.measurement.separation import COLUMNS, SeparationConfig
from tests.separation_fits import dense_fit, ogd_fit


def _table(module):
    return json.loads((module.run_dir / "separation_table.json").read_text())


def test_dense_table_rows_columns_and_eta():
    module, _ = dense_fit()
    table = _table(module)
    rows = table["rows"]
    assert [(r["variant"], r["alpha"]) for r in rows] == [("public", None), ("dense", None),
                                                          ("svd_clean", None), ("pruned", None)]
    assert all(set(COLUMNS) <= set(r) for r in rows)
    by = {r["variant"]: r for r in rows}
    eta = module.displacements().entanglement().overall
    assert by["dense"]["eta"] == pytest.approx(eta) and 0 <= eta <= 1
    assert by["svd_clean"]["eta"] is None and by["public"]["eta"] is None  # never the SVD's 0
    assert table["eta"]["overall"] == pytest.approx(eta)
    for name in ("svd_clean", "pruned"):
        assert len(by[name]["barrier_curve"]) == 11
        assert by[name]["barrier_paper"] >= by[name]["barrier_linear"] - 1e-9
    assert all(r["nf4_extraction_rate"] is not None and r["int4_rtn_extraction_rate"] is not None for r in rows)
    assert (module.run_dir / "hf_model").is_dir() and (module.run_dir / "summary.json").is_file()


def test_svd_row_at_full_energy_matches_the_fine_tuned_model():
    module, _ = dense_fit()  # the table's split keeps energy 1.0: τ_gen = τ up to float64 round-off
    by = {r["variant"]: r for r in _table(module)["rows"]}
    svd, dense = by["svd_clean"], by["dense"]
    assert svd["extraction_rate"] == dense["extraction_rate"]
    assert svd["holdout_extraction_rate"] == dense["holdout_extraction_rate"]
    assert svd["public_ppl"] == pytest.approx(dense["public_ppl"], rel=1e-4)
    assert svd["mia_auc_loss"] == pytest.approx(dense["mia_auc_loss"], abs=1e-6)
    assert abs(svd["barrier_linear"]) < 1e-4  # W_clean = W_ft: the curve is the dense one


def test_ogd_table_has_the_alpha_rows_and_the_alpha_barrier():
    module, _ = ogd_fit()
    table = _table(module)
    rows = table["rows"]
    assert [(r["variant"], r["alpha"]) for r in rows] == [("public", None), ("ogd", 0.0), ("ogd", 1.0),
                                                          ("svd_clean", None), ("pruned", None)]
    by = {(r["variant"], r["alpha"]): r for r in rows}
    one, zero = by[("ogd", 1.0)], by[("ogd", 0.0)]
    assert 0 <= one["eta"] <= 1 and zero["eta"] is None
    assert one["barrier_linear"] is not None and len(one["barrier_curve"]) == 11
    bits = module.private_streams().bits_per_weight()
    assert one["bits_per_weight"] == pytest.approx(32 + bits["coefficients"] + bits["basis"])
    assert by[("svd_clean", None)]["energy"] == 0.9
    assert "| ogd | α=1 |" in (module.run_dir / "separation_table.md").read_text()


def test_no_secret_text_in_the_table_files():
    for module, _ in (dense_fit(), ogd_fit()):
        text = "".join((module.run_dir / f"separation_table.{ext}").read_text() for ext in ("json", "md"))
        for canary in module.probe.members.texts + module.probe.holdout.texts:
            assert canary not in text


@pytest.mark.parametrize("kwargs, setting", [
    ({"energy": 0.0}, "energy"), ({"energy": 1.5}, "energy"), ({"barrier_points": 5}, "barrier_points"),
    ({"barrier_batches": 0}, "barrier_batches"), ({"metrics": ["speed"]}, "metrics"),
    ({"quantised": ["fp8"]}, "quantised"), ({"every_n_steps": -1}, "every_n_steps"),
    ({"group_size": 0}, "group_size"), ({"exposure_references": 0}, "exposure_references"),
])
def test_bad_settings_fail_naming_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        if "every_n_steps" in kwargs:
            SeparationTableCallback(**kwargs)
        else:
            SeparationTableCallback(table=SeparationConfig(**kwargs))
