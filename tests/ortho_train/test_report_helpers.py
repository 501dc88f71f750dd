"""The report's small pieces against hand-computed values: the t interval over seeds, config
grouping, the relearning reader, the audit column, PrivLeak per deployment, bar labels."""
import math

import numpy as np
import pytest

from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import labelled_bars, value_label, wrap
from ortho_train.report.privacy import audit_key, epsilon_positions, row_label
from ortho_train.report.privleak import privleak_values
from ortho_train.report.relearning import curves, read_rows
from ortho_train.report.section import new_figure
from ortho_train.report.seeds import config_groups, interval_rows, t_interval, t_quantile


def test_t_interval_by_hand():
    # values 0.2, 0.4, 0.9: mean 0.5, s² = (0.09 + 0.01 + 0.16) / 2 = 0.13, t_{0.975,2} = 4.3027
    mean, half, low, high = t_interval([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5) and (low, high) == (0.2, 0.9)
    assert half == pytest.approx(4.3027 * math.sqrt(0.13) / math.sqrt(3), rel=1e-9)
    with pytest.raises(ValueError, match="at least two runs"):
        t_interval([1.0])


def test_t_quantiles_match_scipy():
    from scipy import stats

    for dof in (1, 2, 5, 29, 30, 31, 45, 200):
        assert t_quantile(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=2e-4), dof


def _run(name: str, config: dict | None, **tables) -> RunArtifacts:
    return RunArtifacts(path=None, name=name, config=config or {}, **tables)


def test_runs_group_by_config_apart_from_seeds():
    base = {"model": {"init_args": {"lr": 0.1, "dp": {"seed": 3}}}, "trainer": {"max_steps": 5}}
    runs = [_run("a", base | {"seed_everything": 0}), _run("b", base | {"seed_everything": 1}),
            _run("c", {**base, "trainer": {"max_steps": 6}}), _run("d", None),
            _run("e", {"seed_everything": 2, "model": {"init_args": {"lr": 0.1, "dp": {"seed": 9}}},
                       "trainer": {"max_steps": 5}})]
    groups = config_groups(runs)
    assert [[r.name for r in g] for g in groups] == [["a", "b", "e"]]
    stats = interval_rows([{"x": 1.0, "y": 2.0}, {"x": 3.0}, {"x": 5.0, "y": 4.0}])
    # x: mean 3, s = 2, t_{0.975,2}·2/√3; y: two runs, t_{0.975,1}·√2/√2
    assert stats["x"][:2] == (3, 3.0) and stats["x"][2] == pytest.approx(4.3027 * 2 / math.sqrt(3))
    assert stats["y"] == pytest.approx((2, 3.0, 12.7062, 2.0, 4.0))


def test_relearning_reader_takes_the_documented_schema_and_aliases():
    payload = {"rows": [
        {"condition": "forget_heldout", "steps": 0, "deployment": "fp", "extraction": 0.0, "nll": 3.5,
         "model": "unlearned"},
        {"condition": "forget_heldout", "steps": 10, "deployment": "nf4", "extraction_rate": 0.5, "mean_nll": 2.0,
         "model": "unlearned"},
        {"condition": "public", "steps": 10, "forget_extraction": 0.25, "model": "start"},  # deployment: fp
        {"condition": "public", "steps": "ten", "extraction": 0.1},  # no integer steps: left out
        {"steps": 5, "extraction": 0.1},  # no condition
        {"condition": "public", "steps": 5},  # no metric
        "not a row",
    ]}
    rows, dropped = read_rows(payload)
    assert dropped == 4 and len(rows) == 3
    assert rows[1] == {"condition": "forget_heldout", "steps": 10, "deployment": "nf4", "model": "unlearned",
                       "extraction": 0.5, "nll": 2.0}
    assert rows[2]["deployment"] == "fp" and rows[2]["nll"] is None
    assert read_rows(payload["rows"])[0] == rows  # a bare list of rows reads the same
    lines = curves(rows, "extraction")
    assert lines == {"forget_heldout": {("unlearned", "fp"): [(0, 0.0)], ("unlearned", "nf4"): [(10, 0.5)]},
                     "public": {("start", "fp"): [(10, 0.25)]}}


def test_audit_column_is_found_when_present():
    rows = [{"kind": "run", "alpha": 1.0, "epsilon": 8.0, "noise": None, "audit_epsilon_lower": 0.7},
            {"kind": "posthoc_dual", "alpha": 1.0, "epsilon": 8.0, "noise": 0.1}]
    assert audit_key(rows) == "audit_epsilon_lower"
    assert audit_key([{"kind": "run", "epsilon_audit_lower_bound": 1.0}]) == "epsilon_audit_lower_bound"
    assert audit_key([{"kind": "run", "epsilon": 8.0}]) is None
    assert [row_label(r) for r in rows] == ["run α=1", "posthoc_dual σ=0.1"]
    # "none" sits right of the largest numeric ε: 8 · 1.25 + 1
    xs, none_at = epsilon_positions([{"epsilon": 0.0}, {"epsilon": 8.0}, {"epsilon": "none"}])
    assert xs == [0.0, 8.0, 11.0] and none_at == 11.0


def test_privleak_values_per_deployment():
    gap = {"variants": ["nf4", "int4_rtn"], "forget_privleak_fp": 4.0, "forget_privleak_nf4": -2.0,
           "forget_privleak_fp_before": 75.0, "forget_privleak_se_fp": -86.0}
    assert privleak_values(gap) == {"fp": (4.0, 75.0), "nf4": (-2.0, None)}  # int4_rtn not measured
    assert privleak_values({"variants": ["nf4"], "privleak_refused": "no reference"}) == {}


def test_zero_and_missing_bars_are_labelled_and_marked():
    fig, (ax,) = new_figure(1)
    labelled_bars(ax, np.arange(3), [0.0, None, 0.5])
    assert [t.get_text() for t in ax.texts] == ["0", "–", "0.5"]
    markers = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [0, 1]  # the zero and the missing bar
    assert value_label(1234.5) == "1234" and value_label(0.01234, 3) == "0.0123"
    assert wrap("forget_extraction_int4_rtn_adapter") == "forget_\nextraction_\nint4_rtn_\nadapter"
