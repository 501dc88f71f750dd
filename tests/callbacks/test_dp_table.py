"""DPTableCallback: the privacy table of a tiny DP-SGD isolated fine-tune, end to end."""
import json
import re

import pytest

from ortho_callbacks.dp_table import DPTableCallback
from ortho_train.measurement.privacy import COLUMNS, PrivacyTableConfig
from tests.ortho_train.dp_helpers import dp_fit, single_thread  # noqa: F401

KINDS = ["run", "run", "posthoc_global", "posthoc_dual", "int4_gptq", "int4_gptq_noise", "stochastic_quant"]


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    table = PrivacyTableConfig(posthoc_sigmas=[0.1], stochastic_sigmas=[1.0], group_size=32, exposure_references=10,
                               metrics=["extraction", "exposure", "mia", "ppl", "rmia", "audit"])
    callback = DPTableCallback(table=table, calibration_batches=2)
    module = dp_fit(tmp_path_factory.mktemp("dp_table"), callbacks=[callback])
    return module, callback


def test_rows_columns_epsilon_and_no_secret_in_the_files(table_run):
    module, callback = table_run
    rows = json.loads((module.run_dir / "dp_table.json").read_text())
    assert [r["kind"] for r in rows] == KINDS
    for row in rows:
        assert set(COLUMNS) <= row.keys()
    epsilon = module.final_metrics["dp"]["epsilon"]
    assert rows[0]["alpha"] == 0.0 and rows[0]["epsilon"] == 0.0  # the public model
    assert rows[1]["alpha"] == 1.0 and rows[1]["epsilon"] == pytest.approx(epsilon)
    assert all(r["epsilon"] == pytest.approx(epsilon) for r in rows[2:])  # post-processing keeps ε
    assert [r["noise"] for r in rows[2:]] == [0.1, 0.1, None, 0.1, 1.0]
    assert rows[2]["bits_per_weight"] == 32.0 and rows[3]["bits_per_weight"] < 32.0
    # the one-run audit, at the run's δ, never claims more than the accountant's ε
    delta = module.final_metrics["dp"]["delta"]
    for row in rows:
        assert row["audit_delta"] == delta and 0.0 <= row["audit_epsilon_lb"] <= epsilon, row["kind"]
        assert 0.0 <= row["mia_auc_rmia"] <= 1.0
    assert "| kind | α | ε | audit ε ≥ | noise σ |" in (module.run_dir / "dp_table.md").read_text()
    markdown = (module.run_dir / "dp_table.md").read_text()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == len(rows) + 1
    assert "not a privacy guarantee" in markdown
    assert (module.run_dir / "summary.json").exists() and (module.run_dir / "hf_model").is_dir()
    # no secret in the table files (one test with the above: under pytest-xdist two tests of one
    # module-scoped run may land on both workers, and each would train it)
    strings = [v for row in rows for v in row.values() if isinstance(v, str)]
    # numbers are measurements (a 4-digit secret may occur among a float's digits by chance)
    markdown = re.sub(r"\d+\.\d+", "", (module.run_dir / "dp_table.md").read_text())
    for canary in module.probe.members.texts:
        secret = canary.split("is ")[-1].rstrip(".")
        assert not any(secret in s or canary in s for s in strings)
        assert secret not in markdown and canary not in markdown


def test_bad_callback_settings_fail_in_init():
    with pytest.raises(ValueError, match="calibration_batches"):
        DPTableCallback(calibration_batches=0)
    for bad, setting in (({"posthoc_sigmas": [-1.0]}, "sigmas must be finite"), ({"bits": 5}, "bits"),
                         ({"metrics": ["ppl", "vibes"]}, "metrics"), ({"alphas": [2.0]}, "alphas"),
                         ({"rho": 0.0}, "rho")):
        with pytest.raises(ValueError, match=setting):
            PrivacyTableConfig(**bad)
