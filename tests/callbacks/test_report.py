"""ReportCallback: run_info.json and report.html at fit end (also when the fit fails), the
TensorBoard layout / headline metrics, and the kill-switch figures the SieveCallback sends."""
import json
import re

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ortho_callbacks.report import ReportCallback
from ortho_callbacks.sieve import SieveCallback
from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig
from ortho_train.quantisation import QuantConfig
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.core import SieveConfig
from ortho_train.sieve.table import TableConfig
from tests.tensorboard_rows import row_runs
from tests.ortho_train.unlearn_helpers import one_thread, single_thread  # noqa: F401


def _events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def _status(page: str, key: str) -> str:
    match = re.search(rf'<h3 id="{key}">[^<]*</h3>(<p class="skipped">)?', page)
    assert match, key
    return "skipped" if match.group(1) else "present"


def test_tiny_fit_writes_run_info_report_and_tensorboard_summaries(tiny_run):
    _, run_dir = tiny_run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["global_step"] == 24 and info["wall_seconds"] > 0
    assert info["peak_rss_gib"] > 0.1 and len(info["load_average"]) == 3
    assert {"python", "torch", "lightning", "matplotlib"} <= info["versions"].keys()
    page = (run_dir / "report.html").read_text()
    assert "<td>torch version</td>" in page and "lr-AdamW" in page  # versions and the learning rate
    tags = _events(run_dir).Tags()
    assert "custom_scalars__config__" in tags["tensors"]
    summary = json.loads((run_dir / "summary.json").read_text())
    accumulator = _events(run_dir)
    assert accumulator.Scalars("headline/extraction")[-1].value == pytest.approx(summary["extraction_rate"])
    assert accumulator.Scalars("headline/MIA_AUC_loss")[-1].value == pytest.approx(summary["mia_auc_loss"])


@pytest.fixture(scope="module")
def sieve_fit(tmp_path_factory):
    """A tiny dense canary fine-tune with a periodic kill-switch table on a dense α grid."""
    tmp = tmp_path_factory.mktemp("report_sieve")
    module = CanarySFTModule(tiny_llama=TinyLlamaConfig(32, 2, 2, 64), public_steps=2, lr=1e-2, sft_lr=1e-2,
                             warmup_steps=1, sft_warmup_steps=1, eval_during_validation=False)
    table = TableConfig(variants=["posthoc"], references=["fp32"], alphas=[0.0, 0.5, 1.0], rhos=[0.05],
                        spec=SieveConfig(QuantConfig("rtn", 4, 32)), metrics=["extraction"])
    sieve = SieveCallback(every_n_steps=2, table=table, calibration_batches=1, save_isolated=False)
    loggers = [TensorBoardLogger(tmp, name="sieve", version=0), CSVLogger(tmp, name="sieve", version=0)]
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=loggers, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[sieve, ReportCallback()], enable_progress_bar=False,
                        enable_model_summary=False)
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=20)
    with one_thread():
        trainer.fit(module, datamodule=dm)
    return module.run_dir


def test_sieve_tables_reach_the_report_and_tensorboard(sieve_fit):
    page = (sieve_fit / "report.html").read_text()
    # every 2 steps of the canary phase (steps 2-6), the last one being the final table
    assert sorted(p.name for p in sieve_fit.glob("sieve_table_step*.json")) == ["sieve_table_step4.json"]
    for key in ("kill_switch", "over_training", "memorisation"):
        assert _status(page, key) == "present", key
    assert "<td>posthoc</td><td>0.50</td>" in page  # the α grid the callback was asked for
    assert "<th>4</th><th>6</th>" in page  # over training: the periodic table and the final one
    images = _events(sieve_fit).Tags()["images"]
    assert {"sieve/figures/0", "sieve/figures/1"} <= set(images)
    assert [e.step for e in _events(sieve_fit).Images("sieve/figures/0")] == [4, 6]
    # every table row is a TensorBoard run: α and the variant as hparams, not inside the tag name
    rows = row_runs(sieve_fit, "sieve")
    assert set(rows) == {"fp32", "posthoc_rho0.05_a0", "posthoc_rho0.05_a0.5", "posthoc_rho0.05_a1"}
    half = rows["posthoc_rho0.05_a0.5"]
    assert half["hparams"]["variant"] == "posthoc" and half["hparams"]["alpha"] == 0.5
    assert [step for step, _ in half["scalars"]["sieve/extraction_rate"]] == [4, 6]
    final = [r for r in json.loads((sieve_fit / "sieve_table.json").read_text()) if r["alpha"] == 0.5][0]
    assert half["scalars"]["sieve/extraction_rate"][-1][1] == pytest.approx(final["extraction_rate"])
    assert not any("_a0" in tag for tag in _events(sieve_fit).Tags()["scalars"])


class LoggingBoringModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out


class FailAtTrainEnd(L.Callback):
    def on_train_end(self, trainer, pl_module):
        raise RuntimeError("boom")


def test_report_is_written_when_the_fit_fails(tmp_path):
    report = ReportCallback(filename="failed.html", tensorboard=False)
    trainer = L.Trainer(max_steps=2, logger=CSVLogger(tmp_path, name="boring"), enable_checkpointing=False,
                        limit_val_batches=0, log_every_n_steps=1, callbacks=[FailAtTrainEnd(), report], enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(LoggingBoringModel())
    page = report.path.read_text()
    assert report.path.name == "failed.html" and report.path.parent == tmp_path / "boring" / "version_0"
    assert _status(page, "training") == "present"  # the logged train/loss, from metrics.csv
    assert json.loads((report.path.parent / "run_info.json").read_text())["global_step"] == 2


def test_filename_must_be_plain():
    with pytest.raises(ValueError, match="plain file name"):
        ReportCallback(filename="../report.html")
