"""The HTML report: built from a real tiny SFT run and from hand-written sieve / unlearning run
directories; every section present when its data is there and skipped with one line when not;
images decode; nothing fetches a URL; no secret reaches the page; bad files cost one line."""
import base64
import html
import json
import re
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest

from ortho_train.report import build_report, load_run
from ortho_train.report.__main__ import main
from ortho_train.report.memorisation import skewnorm_pdf
from tests.ortho_train.unlearn_helpers import single_thread  # noqa: F401
from tests.secret_scan import holds_secret

SECTIONS = ("run", "training", "memorisation", "deployments_roc", "kill_switch", "privacy", "separation",
            "unlearning", "privleak", "relearning", "over_training", "comparison", "seeds")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(variant, alpha, rho, extraction, ppl, bits, exposure=5.0):
    return {"variant": variant, "alpha": alpha, "rho": rho, "extraction_rate": extraction,
            "exposure_mean": exposure, "mia_auc_loss": 0.5 + extraction / 2, "public_ppl": ppl,
            "bits_per_weight": bits, "ortho_density": 0.0 if alpha is None else 0.05,
            "holdout_extraction_rate": 0.0, "symbol_accuracy": extraction, "base": None, "seconds": 0.1}


def sieve_rows(scale: float = 1.0) -> list[dict]:
    rows = [_row("fp32", None, None, 1.0 * scale, 6.61, 32.0, 8.9), _row("int4_gptq", None, 0.0, 0.95 * scale, 6.61, 4.26),
            _row("nf4", None, None, 0.95 * scale, 6.66, 4.5), _row("pre_sft", None, None, 0.0, 6.60, 32.0, 2.6)]
    rows += [_row("isolated", a, 0.05, a * scale, 6.6 + 0.01 * a, 4.26 if a == 0 else 6.66, 2.5 + 6 * a)
             for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return rows + [_row("posthoc", a, 0.01, 0.9, 6.62, 4.26 if a == 0 else 4.74) for a in (0.0, 1.0)]


def write_sieve_run(root):
    """A run directory as an isolated SFT with the SieveCallback (every 4 steps) leaves it."""
    run = root / "sieve_run" / "version_0"
    (run / "sieved_isolated").mkdir(parents=True)
    (run / "sieve_table.json").write_text(json.dumps(sieve_rows()))
    (run / "sieve_table_step4.json").write_text(json.dumps(sieve_rows(0.5)))
    (run / "run_info.json").write_text(json.dumps({"global_step": 8, "wall_seconds": 12.5,
                                                   "versions": {"torch": "2.x"}}))
    (run / "summary.json").write_text(json.dumps({"extraction_rate": 1.0, "exposure_mean": 8.9,
                                                  "mia_auc_loss": 1.0, "public_ppl": 6.61}))
    (run / "sieved_isolated" / "sieve_config.json").write_text(json.dumps({"metadata": {"variant": "isolated",
                                                                                       "rho": 0.05}}))
    (run / "sieved_isolated" / "base.safetensors").write_bytes(b"\0" * 300_000)
    (run / "sieved_isolated" / "ortho.safetensors").write_bytes(b"\0" * 120_000)
    return run


def write_unlearning_run(root):
    """A run directory as LoRA unlearning with the PTQGapCallback and AdapterExportCallback leaves it."""
    run = root / "unlearn_run" / "version_0"
    run.mkdir(parents=True)
    variants = ["nf4", "nf4_adapter", "int4", "int4_adapter"]
    gap = {"variants": variants, "status": "ok", "forgetting_survives": True, "max_extraction_gap": 0.05,
           "bin_crossing_fraction_nf4": 0.054, "dequantised_change_fraction_nf4": 0.6,
           "bin_crossing_fraction_int4": 0.03, "dequantised_change_fraction_int4": 0.5, "median_abs_update": 1e-4}
    for name in ["fp"] + variants:
        gap |= {f"forget_extraction_{name}": 0.05 if name.startswith("int4") else 0.0,
                f"forget_mia_auc_loss_{name}": 0.87, f"forget_verbmem_{name}": 0.2,
                f"forget_exposure_{name}": 3.75, f"public_ppl_{name}": 6.58, f"holdout_extraction_{name}": 0.0,
                f"forget_extraction_{name}_before": 1.0, f"forget_exposure_{name}_before": 9.97,
                f"public_ppl_{name}_before": 6.61}
        if name != "fp":
            gap[f"ptq_gap_extraction_{name}"] = gap[f"forget_extraction_{name}"]
    (run / "ptq_gap.json").write_text(json.dumps(gap))
    (run / "metrics_card.json").write_text(json.dumps({"method": {"mode": "lora", "loss": "npo_gdr", "lr": 1e-3},
                                                       "training": {"cad": 0.31, "steps": 60}}))
    lines = ["epoch,step,train/loss,train/forget_loss,guard/retain_ppl"]
    lines += [f"0,{s},{1.0 - s / 100},{2.0 - s / 50},{6.6 + s / 1000}" for s in range(0, 60, 10)]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    for step in range(10, 60, 10):  # PTQGapCallback(every_n_steps=10) before the final step 60
        (run / f"ptq_gap_step{step}.json").write_text(json.dumps(
            {"forget_extraction_fp": 1.0 - step / 60, "forget_extraction_nf4": 1.0 - step / 70}))
    (run / "run_info.json").write_text(json.dumps({"global_step": 60}))
    return run


def section_status(page: str) -> dict[str, str]:
    """`{section key: "present" | "skipped: <line>"}` of every section of the page, in order."""
    found = {}
    for match in re.finditer(r'<h3 id="(\w+)">[^<]*</h3>(<p class="skipped">skipped: ([^<]*)</p>)?', page):
        found.setdefault(match.group(1), "present" if match.group(2) is None
                         else f"skipped: {html.unescape(match.group(3))}")
    return found


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b64, validate=True) for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    return {"tiny": tiny_run[1], "sieve": write_sieve_run(root), "unlearn": write_unlearning_run(root)}


@pytest.fixture(scope="module")
def combined(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("combined") / "report.html"
    start = time.process_time()  # CPU seconds: what the build costs, whatever else the machine runs
    build_report([runs["tiny"], runs["sieve"], runs["unlearn"]], out)
    return out, time.process_time() - start


def test_tiny_sft_run_writes_plot_data_and_its_report(runs):
    run = runs["tiny"]
    roc = json.loads((run / "roc.json").read_text())
    assert set(roc["curves"]) >= {"loss", "zlib", "mink", "minkpp"} and roc["holdout"] == 16
    for curve in roc["curves"].values():
        assert curve["fpr"][0] == curve["tpr"][0] == 0.0 and curve["fpr"][-1] == curve["tpr"][-1] == 1.0
        assert set(curve) == {"fpr", "tpr", "auc", "tpr_at_fpr"}  # rates only, no scores or thresholds
    summary = json.loads((run / "summary.json").read_text())
    assert roc["curves"]["loss"]["auc"] == pytest.approx(summary["mia_auc_loss"])
    hist = json.loads((run / "exposure_refs.json").read_text())
    assert sum(hist["counts"]) == hist["contexts"] * hist["references"] == 4 * 200
    assert len(hist["bin_edges"]) == len(hist["counts"]) + 1 and len(hist["member_log_perplexity"]) == 4
    status = section_status((run / "report.html").read_text())
    assert list(status) == list(SECTIONS)
    assert [k for k, v in status.items() if v == "present"] == ["run", "training", "memorisation"]
    assert status["kill_switch"] == "skipped: this run has no sieve_table.json"
    assert status["unlearning"] == "skipped: this run has no ptq_gap.json"
    assert status["comparison"].startswith("skipped: one run only")
    assert status["privacy"] == "skipped: this run has no dp_table.json"
    assert status["relearning"] == "skipped: this run has no relearning.json"


def test_every_section_present_when_its_data_is(combined):
    page = combined[0].read_text()
    per_run = re.split(r"<h2>", page)[1:]  # tiny, sieve, unlearn, all runs
    assert len(per_run) == 4
    sieve, unlearn, together = section_status(per_run[1]), section_status(per_run[2]), section_status(per_run[3])
    assert {k for k, v in sieve.items() if v == "present"} == {"run", "memorisation", "kill_switch", "over_training"}
    assert sieve["training"] == "skipped: this run has no metrics.csv"
    assert {k for k, v in unlearn.items() if v == "present"} == {"run", "training", "unlearning", "over_training"}
    assert unlearn["memorisation"].startswith("skipped: no memorisation data")
    assert together == {"comparison": "present", "seeds": "skipped: no two runs share a configuration (apart "
                        "from seeds): pass several seeds of one config to see intervals"}
    assert unlearn["privleak"] == "skipped: ptq_gap.json has no forget_privleak_* values"
    # the numbers under the plots: the dense α grid, the PTQ deployments, the headline table
    assert "<td>isolated</td><td>0.25</td>" in per_run[1] and "<th>nf4_adapter</th>" in per_run[2]
    assert "CAD (circuit attribution divergence, before vs after): 0.3100" in per_run[2]
    assert per_run[3].count("<tr><td>") == 3  # one headline row per run


def test_images_decode_and_nothing_is_fetched(combined):
    page = combined[0].read_text()
    images = embedded_pngs(page)
    assert len(images) >= 10
    for png in images:
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
        width, height = struct.unpack(">II", png[16:24])  # IHDR
        assert width >= 400 and height >= 300
    for forbidden in ("http://", "https://", 'src="//', "<script", "<link", "url(", "@import"):
        assert forbidden not in page, forbidden


def test_secrets_and_canary_texts_never_reach_the_report(tiny_run, combined):
    cli, run_dir = tiny_run
    canaries = cli.datamodule.canaries
    pages = [combined[0].read_text(), (run_dir / "report.html").read_text()]
    for canary in canaries.members + canaries.holdout:
        for page in pages:
            assert not holds_secret(page, canary.secret, cli.datamodule.hparams.secret_alphabet)
            assert canary.text not in page


def test_report_builds_fast(combined):
    assert combined[1] < 10.0, f"building the report of three runs took {combined[1]:.1f} CPU seconds"


def test_corrupt_or_wrong_json_costs_one_line_and_the_rest_is_written(runs, tmp_path):
    run = tmp_path / "broken" / "version_0"
    shutil.copytree(runs["sieve"], run)
    (run / "summary.json").write_text('{"extraction_rate": 1.0,')  # truncated
    (run / "sieve_table_step4.json").write_text('{"not": "a list"}')
    (run / "sieve_table.json").write_text(json.dumps([{"variant": "isolated", "alpha": "one"}]))  # bad row
    out = build_report([run], tmp_path / "report.html")
    page = out.read_text()
    assert page.count("summary.json could not be read (") == 1
    assert page.count("sieve_table_step4.json holds a JSON dict, not the expected list") == 1
    status = section_status(page)
    assert status["memorisation"].startswith("skipped: no memorisation data: summary.json unreadable (see")
    assert status["kill_switch"].startswith("skipped: could not be drawn from this run's files (")
    assert status["run"] == "present" and len(embedded_pngs(page)) == 1  # the stream sizes still drawn
    assert "base.safetensors" in page


def test_metrics_csv_problems_are_reported(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,1,oops\n")
    loaded = load_run(run)
    assert loaded.problems["metrics.csv"].startswith("metrics.csv could not be read (line 2, column 'train/loss'")
    assert loaded.series == {}


def test_command_line(tmp_path, capsys):
    for name, extraction in (("a", 1.0), ("b", 0.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"extraction_rate": extraction}))
    out = tmp_path / "both.html"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out and section_status(out.read_text())["comparison"] == "present"
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "not a directory" in capsys.readouterr().err


def test_opens_in_headless_chromium_without_console_errors(combined, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium)")
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1400,2400", combined[0].as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    log = result.stdout + result.stderr
    assert shot.is_file() and shot.stat().st_size > 20_000, log[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC)
    for marker in ("Uncaught", "ERROR:CONSOLE", "Not allowed to load local resource", "net::ERR_"):
        assert marker not in log, log[-2000:]


def test_skewnorm_density_matches_scipy():
    from scipy import stats

    x = np.linspace(30.0, 70.0, 41)
    assert np.allclose(skewnorm_pdf(x, 1.8, 46.9, 2.5), stats.skewnorm.pdf(x, 1.8, 46.9, 2.5), rtol=1e-10, atol=1e-14)


def test_ptq_curves_join_before_periodic_and_final(runs):
    """The over-training PTQ curves: `_before` values at step 0, the periodic files, the final gap."""
    from ortho_train.report.load import load_run
    from ortho_train.report.over_training import ptq_curves

    run = load_run(runs["unlearn"])
    curves = ptq_curves(run, 60)
    assert [step for step, _ in curves["fp"]] == [0, 10, 20, 30, 40, 50, 60]
    assert curves["fp"][0] == (0, 1.0) and curves["fp"][-1] == (60, 0.0)  # before, final
    assert dict(curves["nf4"])[20] == pytest.approx(1.0 - 20 / 70)
    assert "nf4_adapter" in curves and "fp_before" not in curves


def test_malformed_files_and_non_numbers_cost_one_line_each(runs, tmp_path):
    """A metrics card or run_info of the wrong shape skips its own section only; a measurement that
    is not a number is shown as – and named, with its file, in one line."""
    run = tmp_path / "malformed" / "version_0"
    shutil.copytree(runs["sieve"], run)
    (run / "run_info.json").write_text(json.dumps({"versions": ["torch", "2.13"], "wall_seconds": 3.0}))
    (run / "summary.json").write_text(json.dumps({"extraction_rate": "abc", "public_ppl": 7.5}))
    page = build_report([run], tmp_path / "report.html").read_text()
    status = section_status(page)
    assert status["run"].startswith("skipped: could not be drawn from this run's files (AttributeError")
    assert status["kill_switch"] == "present"
    assert page.count("summary.json holds values that are not numbers (summary.json.extraction_rate = &#x27;abc&#x27;)") == 1
    assert ">abc<" not in page


def test_command_line_output_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"extraction_rate": 1.0}))
    (tmp_path / "file").write_text("in the way")
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "file" / "report.html")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: the report cannot be written to {tmp_path / 'file' / 'report.html'}")
