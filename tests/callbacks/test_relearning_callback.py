"""RelearningCallback after a LoRA unlearning fit of the tiny memorised model, and its start-up checks."""
import json
from argparse import ArgumentError
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from ortho_callbacks.adapter_export import AdapterExportCallback
from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_callbacks.relearning import RelearningCallback
from ortho_train.evaluation import extraction_metrics
from ortho_train.measurement.relearning import ROW_KEYS, RelearningConfig
from ortho_train.settings import SettingError
from ortho_train.token_datasets import subset_canaries
from ortho_train.unlearn_module import UnlearnModule
from tests.callbacks.test_callback_settings import from_init_args
from tests.ortho_train.unlearn_helpers import cached_tiny_canary_model, single_thread, tiny_datamodule  # noqa: F401
from tests.secret_scan import holds_secret


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_tiny_canary_model(tmp_path_factory)


class Snapshot(L.Callback):
    """The run's weights as the callbacks after this one receive them at fit end."""

    def on_fit_end(self, trainer, module):
        self.state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_relearning_after_lora_unlearning(model_dir, tmp_path, capsys):
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo", lr=1e-3, guard_every_n_steps=0,
                           attribution_batches=0)
    relearning = RelearningCallback(RelearningConfig(steps=[0, 3], lr=1e-3, batch_size=2, seed=1,
                                                     references=["start"]))
    snapshot = Snapshot()
    ptq = PTQGapCallback(formats=["nf4"], exposure_references=20, final_exposure_references=20, evaluate_before=False)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ptq, AdapterExportCallback(), snapshot, relearning])
    dm = tiny_datamodule(model_dir)
    trainer.fit(module, datamodule=dm)
    # the run's model is what it was before the callback ran; its export landed before it
    assert all(torch.equal(snapshot.state[k], v) for k, v in module.model.state_dict().items())
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    result = json.loads((tmp_path / "relearning.json").read_text())
    assert result["schema"] == 1 and result["deployments"] == ["fp", "nf4"]
    assert list(result["models"]) == ["unlearned", "start"] and result["models"]["start"] == str(model_dir.resolve())
    split = result["split"]
    assert split["forget_canaries"] == 4 and len(split["relearn"]) == 2 and len(split["measured"]) == 2
    assert not set(split["relearn"]) & set(split["measured"])
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 2 and all(tuple(r) == ROW_KEYS for r in rows)  # models × conditions × steps × fmts
    by = {(r["model"], r["condition"], r["steps"], r["deployment"]): r for r in rows}
    measured = subset_canaries(dm.forget_probe.members, split["measured"])
    # step 0 in full precision is the plain extraction of the measured canaries: the unlearned
    # model's own, and the start model's (it memorised every canary)
    assert by["unlearned", "forget", 0, "fp"]["extraction"] == extraction_metrics(module.model, measured)["extraction_rate"]
    assert by["start", "public", 0, "fp"]["extraction"] == 1.0 == by["start", "forget", 0, "fp"]["extraction"]
    assert result["quantisation"]["nf4"] == ptq.settings.describe("nf4")  # the PTQ gap's settings
    markdown = (tmp_path / "relearning.md").read_text()
    assert markdown.startswith("| model | condition | steps | deployment | extraction (held-out forget) |")
    out = capsys.readouterr().out
    assert "[relearning 1/6: unlearned, all conditions, 0 steps] done in" in out and "peak RSS" in out
    for secret in dm.canaries.members:  # never a secret in the artifacts
        for path in ("relearning.json", "relearning.md"):
            assert not holds_secret((tmp_path / path).read_bytes(), secret.secret, "0123456789")


def _setup(callback, model_dir, callbacks=(), forget_members=None):
    dm = tiny_datamodule(model_dir, forget_members=forget_members)
    trainer = SimpleNamespace(callbacks=[*callbacks, callback], datamodule=dm)
    callback.setup(trainer, SimpleNamespace(model_path=str(model_dir)), "fit")


def test_without_any_4bit_deployment_the_start_fails_naming_formats(model_dir):
    with pytest.raises(SettingError, match=r"RelearningCallback\.formats=None: no 4-bit deployment"):
        _setup(RelearningCallback(), model_dir)
    with pytest.raises(SettingError, match=r"RelearningCallback\.formats=\[\]"):
        RelearningCallback(formats=[])
    callback = RelearningCallback(RelearningConfig(references=[]))
    _setup(callback, model_dir, [PTQGapCallback(formats=["fp4", "int4_rtn"])])
    assert callback.formats == ["fp4", "int4_rtn"]


def test_a_missing_reference_or_a_forget_set_of_one_fails_at_start_up(model_dir, tmp_path):
    missing = tmp_path / "never_written"
    with pytest.raises(SettingError, match=r"relearning\.references: '.*never_written' names .*which holds no model"):
        _setup(RelearningCallback(RelearningConfig(references=[str(missing)]), formats=["nf4"]), model_dir)
    callback = RelearningCallback(RelearningConfig(references=["start", "pre_canary"]), formats=["nf4"])
    with pytest.warns(UserWarning, match="reference 'pre_canary' skipped: no hf_model_pre_canary"):
        _setup(callback, model_dir)  # the tiny model was not written by a canary SFT: no pre-canary model
    assert list(callback.references) == ["start"] and list(callback.skipped) == ["pre_canary"]
    with pytest.raises(SettingError, match="forget set has 1 canary"):
        _setup(RelearningCallback(RelearningConfig(references=[]), formats=["nf4"]), model_dir, forget_members=[0])


@pytest.mark.parametrize("settings, message", [
    ({"relearning": {"steps": [-1]}}, r"relearning\.steps=\[-1\]"),
    ({"relearning": {"relearn_fraction": 1.5}}, r"relearning\.relearn_fraction=1\.5"),
    ({"relearning": {"conditions": ["private"]}}, "private"),
    ({"formats": ["nf5"]}, r"RelearningCallback\.formats=\['nf5'\]"),
])
def test_config_settings_are_refused_as_a_yaml_gives_them(settings, message):
    with pytest.raises((ValueError, ArgumentError), match=message):
        from_init_args(RelearningCallback, settings)
