"""The report's privacy, separation, PrivLeak, relearning, ROC-per-deployment and seeds sections, on
run directories in the callbacks' exact schemas (`report_fixtures`); a slow acceptance test builds
the same sections from small real runs of the shipped DP, OGD and unlearning configs and opens
each report in headless Chromium."""
import html
import re
import shutil
import subprocess

import pytest

from ortho_train.report import build_report
from tests.ortho_train.report_fixtures import (write_dp_run, write_ogd_run, write_seed_runs,
                                               write_unlearn_run)
from tests.ortho_train.test_report import PNG_MAGIC, embedded_pngs, section_status

CONSOLE_ERRORS = ("Uncaught", "ERROR:CONSOLE", "Not allowed to load local resource", "net::ERR_")


def section_html(page: str, key: str) -> str:
    """The HTML of one section: from its heading to the next heading."""
    start = page.index(f'<h3 id="{key}">')
    end = re.compile(r"<h[23][ >]").search(page, start + 5)
    return page[start:end.start() if end else len(page)]


def figures_in(page: str, key: str) -> int:
    return len(embedded_pngs(section_html(page, key)))


def chromium_screenshot(page_path, shot, height: int = 4000) -> str:
    """Open `page_path` in headless Chromium, write a screenshot; returns its log (skips without it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium)")
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--v=0", f"--screenshot={shot}", f"--window-size=1280,{height}", page_path.as_uri()],
                            capture_output=True, text=True, timeout=180)
    log = result.stdout + result.stderr
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC), log[-2000:]
    for marker in CONSOLE_ERRORS:
        assert marker not in log, log[-2000:]
    return log


@pytest.fixture(scope="module")
def fixture_pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_sections")
    runs = {"dp": write_dp_run(root), "ogd": write_ogd_run(root), "unlearn": write_unlearn_run(root)}
    return {name: build_report([run], root / f"{name}.html").read_text() for name, run in runs.items()}


def test_dp_run_shows_epsilon_against_utility_and_the_audit_bound(fixture_pages):
    page = fixture_pages["dp"]
    status = section_status(page)
    assert status["privacy"] == "present" and status["deployments_roc"] == "present"
    assert figures_in(page, "privacy") == 2  # ε vs PPL / AUC, and accountant vs audit bars
    privacy = section_html(page, "privacy")
    assert "<th>audit ε ≥</th>" in privacy
    # run α=0: ε 0.00 and no audit bound; run α=1: ε 7.99, audit 0.40
    assert "<td>run α=0</td><td>0.00</td><td>–</td>" in privacy
    assert "<td>run α=1</td><td>7.99</td><td>0.40</td>" in privacy
    assert "<td>posthoc_dual σ=0.1</td>" in privacy and "accountant = rdp" in privacy
    # the attack columns (test_report_attacks checks every cell)
    assert "<th>extraction@k</th><th>RMIA AUC ± SE</th><th>RMIA TPR@1%FPR</th><th>RMIA TPR@0.1%FPR</th>" in privacy
    assert "<td>unresolved (n=200)</td>" in privacy
    assert figures_in(page, "deployments_roc") == 1


def test_dp_table_without_audit_column_skips_it(tmp_path):
    page = build_report([write_dp_run(tmp_path, audit=False)], tmp_path / "r.html").read_text()
    privacy = section_html(page, "privacy")
    assert figures_in(page, "privacy") == 1 and "audit ε" not in privacy.split("<table>")[1]
    assert "no audit column in dp_table.json" in privacy


def test_ogd_run_shows_lmc_eta_and_the_split_rows(fixture_pages):
    page = fixture_pages["ogd"]
    status = section_status(page)
    assert status["separation"] == "present" and status["kill_switch"] == "present"
    assert figures_in(page, "separation") == 3  # LMC curves, rows as bars, η per layer
    separation = section_html(page, "separation")
    assert "<td>ogd α=1</td><td>–</td><td>0.50</td>" in separation  # the row, its energy, its extraction
    assert "<td>svd_clean</td><td>0.90</td>" in separation and "svd_clean: W_pre + τ_gen" in separation
    # ROC per deployment: fp32 (from roc.json), pre_sft, ogd α=0 and α=1 — not the α = 0.5 row
    roc = section_html(page, "deployments_roc")
    assert figures_in(page, "deployments_roc") == 1 and "sieve_table.json" in roc
    assert "<th>RMIA AUC ± SE</th>" in section_html(page, "kill_switch")


def test_unlearning_run_shows_privleak_and_relearning(fixture_pages):
    page = fixture_pages["unlearn"]
    status = section_status(page)
    assert status["privleak"] == status["relearning"] == status["unlearning"] == "present"
    assert figures_in(page, "privleak") == 1 and figures_in(page, "relearning") == 1
    privleak = section_html(page, "privleak")
    assert "<td>nf4</td><td>47.40</td><td>0.00</td>" in privleak and "0.540" in privleak
    relearning = section_html(page, "relearning")
    # start model, forget condition, nf4: extraction min(1, 25/20 + 0.5) = 1.00 at 25 steps, NLL 10 − 25/5 = 5
    assert "<td>forget</td><td>start</td><td>nf4</td><td>0.50 (10.00)</td><td>1.00 (8.00)</td><td>1.00 (5.00)</td>" \
        in relearning
    assert "the table measures the other 6" in relearning
    assert "<td>forget extraction@k</td><td>1.00</td><td>0.00</td><td>0.25</td><td>–</td>" in \
        section_html(page, "unlearning")
    # the forget canaries' ROC of fp, nf4, int4_rtn and the start model, side by side
    assert status["deployments_roc"] == "present" and figures_in(page, "deployments_roc") == 1
    assert "ptq_gap.json" in section_html(page, "deployments_roc")


def test_privleak_refused_says_why(tmp_path):
    run = tmp_path / "u"
    run.mkdir()
    (run / "ptq_gap.json").write_text('{"variants": ["nf4"], "forget_extraction_fp": 0.0, '
                                      '"privleak_refused": "no reference model that never saw the forget set"}')
    status = section_status(build_report([run], tmp_path / "r.html").read_text())
    assert status["privleak"] == "skipped: not measured: no reference model that never saw the forget set"


def test_three_seeds_show_intervals(tmp_path):
    page = build_report(write_seed_runs(tmp_path), tmp_path / "seeds.html").read_text()
    assert section_status(page)["seeds"] == "present"
    seeds = html.unescape(section_html(page, "seeds"))
    # extraction 0.2, 0.4, 0.9: mean 0.5, s = √0.13, t_{0.975,2} = 4.3027: half-width 0.896
    assert "<td>extraction</td><td>3</td><td>0.500</td><td>± 0.896</td><td>[-0.396, 1.396]</td>" \
           "<td>0.200 – 0.900</td>" in seeds
    assert figures_in(page, "seeds") == 2  # headline intervals and the α curves with their band
    chromium_screenshot(tmp_path / "seeds.html", tmp_path / "seeds.png")


def test_fixture_reports_open_in_chromium_without_console_errors(fixture_pages, tmp_path):
    for name, page in fixture_pages.items():
        path = tmp_path / f"{name}.html"
        path.write_text(page)
        chromium_screenshot(path, tmp_path / f"{name}.png")


@pytest.mark.slow
def test_real_dp_ogd_and_unlearning_runs_show_their_sections(tmp_path):
    """Small real runs of configs/dp_dual.yaml, ogd_sft.yaml and unlearn_lora_npo_gdr.yaml (toy
    sizes, `report_runs`): each report written by the run's ReportCallback shows its own section
    with plots, and opens in Chromium without console errors."""
    from tests.ortho_train.report_runs import toy_runs

    runs = toy_runs(tmp_path)
    expected = {"dp": {"privacy": 1, "deployments_roc": 1}, "ogd": {"separation": 3, "deployments_roc": 1},
                "unlearn": {"unlearning": 2, "privleak": 1, "deployments_roc": 1}}
    for name, sections in expected.items():
        page_path = runs[name] / "report.html"
        page = page_path.read_text()
        for key, figures in sections.items():
            assert section_status(page)[key] == "present", (name, key)
            assert figures_in(page, key) >= figures, (name, key)
        chromium_screenshot(page_path, tmp_path / f"{name}.png", height=6000)
    # the configs' attacks reach the tables: RMIA and the audit beside ε (DP), the forget
    # canaries' RMIA per deployment and the ROC of every deployment and the start model (unlearning)
    privacy = html.unescape(section_html(runs["dp"].joinpath("report.html").read_text(), "privacy"))
    assert "<th>audit ε ≥</th>" in privacy and "<th>RMIA AUC ± SE</th>" in privacy
    unlearning = html.unescape(section_html(runs["unlearn"].joinpath("report.html").read_text(), "unlearning"))
    assert "<td>forget RMIA AUC ± SE</td>" in unlearning and "<td>forget extraction@k</td>" in unlearning
    assert "ptq_gap.json" in section_html(runs["unlearn"].joinpath("report.html").read_text(), "deployments_roc")
