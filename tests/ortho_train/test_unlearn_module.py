"""UnlearnModule: one-step runs of each mode on a tiny memorised model, the divergence guard,
the forget/retain split, the CLI with a shipped config, and clear errors for bad input."""
import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from ortho_callbacks.adapter_export import AdapterExportCallback
from ortho_train.unlearn_module import LoraAdapterConfig, UnlearningStopped, UnlearnModule
from ortho_train import quantisation as quant
from ortho_train.unlearning.mansu import MansuConfig
from ortho_train.unlearning.modes import UPDATE_MODES
from ortho_train.unlearning.update_mode import UpdateMode
from tests.ortho_train.unlearn_helpers import DATA, cached_tiny_canary_model, single_thread, tiny_datamodule  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_tiny_canary_model(tmp_path_factory)


def _fit(module, model_dir, tmp_path, steps=1, callbacks=(), stopped=False, **data):
    """Fit; `stopped`: the divergence guard must end the run with `UnlearningStopped`."""
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    if stopped:
        with pytest.raises(UnlearningStopped, match="unlearning did not finish"):
            trainer.fit(module, datamodule=tiny_datamodule(model_dir, **data))
    else:
        trainer.fit(module, datamodule=tiny_datamodule(model_dir, **data))
    return trainer


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_step_trains_only_the_adapter(model_dir, tmp_path):
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo_gdr", lr=1e-2, lora=LoraAdapterConfig(rank=4, alpha=8))
    before = _snapshot(module.model)
    _fit(module, model_dir, tmp_path)
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed)  # B starts at 0: the update is no longer zero
    assert module.final_report["steps"] == 1 and math.isfinite(module.final_report["retain_ppl_end"])


@pytest.mark.parametrize("loss", ["ga", "klr", "npo_klr"])
def test_full_step_moves_every_trained_linear(model_dir, tmp_path, loss):
    module = UnlearnModule(str(model_dir), mode="full", loss=loss, lr=1e-3, attribution_batches=0)
    before = quant.effective_linear_weights(module.model)
    _fit(module, model_dir, tmp_path)
    after = quant.effective_linear_weights(module.model)
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
    assert module.trainable_parameter_count == sum(p.numel() for p in module.model.parameters())


class _NormsOnly(UpdateMode):
    """A mode written as a newcomer would: only the RMSNorm gains train."""

    name = "norms"

    def prepare(self, model):
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith("norm.weight"))
        return model


def test_a_new_update_mode_is_one_class_and_one_registry_line(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(UPDATE_MODES, "norms", _NormsOnly)
    module = UnlearnModule(str(model_dir), mode="norms", loss="gdr", lr=1e-2, attribution_batches=0)
    before = _snapshot(module.model)
    _fit(module, model_dir, tmp_path)
    changed = {k for k, v in module.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith("norm.weight") for k in changed), sorted(changed)
    assert module.method_card["mode"] == "norms"


def test_mansu_step_moves_exactly_the_plan_by_at_least_a_bin(model_dir, tmp_path):
    settings = MansuConfig(component_fraction=0.05, retain_sequences=6, fisher_budget=0.5)
    module = UnlearnModule(str(model_dir), mode="mansu", loss="npo", optimizer="sgd", lr=1e-2, mansu=settings)
    before = quant.effective_linear_weights(module.model)
    other = {k: v.clone() for k, v in module.model.state_dict().items() if k.replace(".weight", "") not in before}
    _fit(module, model_dir, tmp_path, steps=2)
    plan, after = module.mansu_plan, quant.effective_linear_weights(module.model)
    assert plan.theta0.numel() > 0
    for name in before:
        moved = after[name] != before[name]
        mask = plan.masks.get(name, torch.zeros_like(moved))
        assert torch.equal(moved, mask), f"{name}: updated entries differ from the plan"
        if name in plan.masks:
            width = quant.bin_width(before[name], "nf4")[mask]
            assert ((after[name] - before[name]).abs()[mask] >= width).all()
    for key, value in other.items():
        assert torch.equal(module.model.state_dict()[key], value), f"{key} is outside the plan but moved"
    report = module.final_report
    assert 0 <= report["cad"] <= 1 and report["mansu"]["updated_weights"] == plan.theta0.numel()


def test_forget_subset_keeps_remaining_members_in_the_retain_batch(model_dir, tmp_path):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append({k: v["input_ids"].shape for k, v in batch.items()})

    module = UnlearnModule(str(model_dir), mode="lora", loss="gdr", lr=1e-3, attribution_batches=0)
    _fit(module, model_dir, tmp_path, callbacks=[Spy()], forget_members=[0, 2], canary_batch_size=2)
    assert len(module.forget_probe.members) == 2 and len(module.retain_members) == 2
    assert seen[0]["forget"][0] == 2 and seen[0]["retain_canary"] == (2, DATA["seq_len"])
    forget_secrets = {tuple(s.tolist()) for s in module.forget_probe.members.secret_ids}
    assert not forget_secrets & {tuple(s.tolist()) for s in module.retain_members.secret_ids}


class _Poison(L.Callback):
    """Keeps a copy of the trainable weights after the guard check of step `at`, then fills
    one weight with NaN before the next step."""

    def __init__(self, at):
        self.at, self.good = at, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at:
            self.good = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                next(p for p in module.model.parameters() if p.requires_grad).fill_(float("nan"))


def test_guard_stops_on_non_finite_loss_and_restores_the_last_good_weights(model_dir, tmp_path):
    module = UnlearnModule(str(model_dir), mode="full", loss="ga", lr=1e-4, guard_every_n_steps=1,
                           attribution_batches=0)
    poison = _Poison(at=2)
    trainer = _fit(module, model_dir, tmp_path, steps=10, callbacks=[poison], stopped=True)
    assert trainer.global_step == 3  # Lightning counts the skipped step, then stops
    assert "non-finite loss (nan) at step 2" in module.divergence and "restored the weights of step 2" in module.divergence
    for name, param in module.model.named_parameters():
        assert torch.equal(param.detach(), poison.good[name]), name


def test_guard_stops_when_retain_perplexity_explodes(model_dir, tmp_path):
    module = UnlearnModule(str(model_dir), mode="full", loss="ga", lr=3e-2, guard_every_n_steps=1,
                           max_retain_ppl_factor=1.2, attribution_batches=0)
    trainer = _fit(module, model_dir, tmp_path, steps=60, callbacks=[AdapterExportCallback()], stopped=True)
    assert trainer.global_step < 60
    card = json.loads((tmp_path / "metrics_card.json").read_text())
    assert card["status"] == "stopped" and "retain perplexity" in card["training"]["divergence"]
    assert (tmp_path / "hf_model_unlearned" / "model.safetensors").is_file()
    assert "retain perplexity" in module.divergence and "exceeds 1.2" in module.divergence
    report = module.final_report
    assert report["retain_ppl_end"] <= 1.2 * report["retain_ppl_start"]  # the restored weights passed the check


def test_canaries_other_than_the_fine_tuning_runs_are_refused(model_dir, tmp_path):
    import shutil

    from ortho_train.provenance import CanaryMismatchError

    run = tmp_path / "sft_run"
    shutil.copytree(model_dir, run / "hf_model")
    (run / "summary.json").write_text(json.dumps(tiny_datamodule(model_dir).canary_record))
    module = UnlearnModule(str(run / "hf_model"), mode="full", loss="ga", attribution_batches=0)
    with pytest.raises(CanaryMismatchError, match=r"data\.canary_seed is 8 here but 7 there"):
        _fit(module, model_dir, tmp_path, canary_seed=8)
    with pytest.raises(CanaryMismatchError, match=r"data\.num_member_canaries is 3 here but 4 there"):
        _fit(module, model_dir, tmp_path, num_member_canaries=3)
    _fit(module, model_dir, tmp_path)  # the same canaries pass


def test_bad_inputs_give_clear_errors(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        UnlearnModule(str(tmp_path / "no_such_model"))
    with pytest.raises(ValueError, match="forget set is empty"):
        tiny_datamodule(model_dir, forget_members=[])
    with pytest.raises(ValueError, match=r"forget_members \[9\] out of range"):
        tiny_datamodule(model_dir, forget_members=[0, 9])
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules \['qkv_proj'\] match no linear layer"):
        UnlearnModule(str(model_dir), mode="lora", lora=LoraAdapterConfig(target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ValueError, match=r"model\.init_args\.mode='partial': must be one of 'lora', 'full', 'mansu'"):
        UnlearnModule(str(model_dir), mode="partial")
    with pytest.raises(ValueError, match="weight_decay=0"):
        UnlearnModule(str(model_dir), mode="mansu", weight_decay=0.1)
    module = UnlearnModule(str(model_dir), mode="full", loss="ga", attribution_batches=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(ValueError, match="train_split='unlearn'"):
        trainer.fit(module, datamodule=tiny_datamodule(model_dir, train_split="sft"))


def test_cli_runs_the_shipped_lora_config_on_the_tiny_model(model_dir, tmp_path, monkeypatch):
    from train import cli_main

    from ortho_callbacks.ptq_gap import PTQGapError

    import shutil

    from ortho_train.models import build_tiny_llama
    from tests.ortho_train.unlearn_helpers import TINY

    # the shipped config's RMIA reads the hf_model_pre_canary beside the model: a model that never
    # saw the canaries stands in for the public model of the tiny fine-tune
    model_dir = shutil.copytree(model_dir, tmp_path / "sft" / "hf_model")
    build_tiny_llama(TINY, 259, 0, 1, seed=5).save_pretrained(tmp_path / "sft" / "hf_model_pre_canary")
    monkeypatch.chdir(tmp_path)
    data = [f"--data.{k}={v}" for k, v in DATA.items()]
    # Two steps of unlearning 4 canaries sit at the edge of the config's gap check (fail_on_gap):
    # whether a 4-bit copy brings one back varies with the CPU's float order. Either outcome must
    # leave every artifact written and say so in ptq_gap.json.
    try:
        cli_main(["fit", "--config", str(REPO / "configs/unlearn_lora_npo_gdr.yaml"),
                  f"--model.init_args.model_path={model_dir}", "--trainer.max_steps=2",
                  "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0",
                  "--data.canary_key_file=null", "--data.canary_secrets=seed", *data])  # the tiny model's canaries follow the seed
        flagged = False
    except PTQGapError:
        flagged = True
    run = next(Path("runs").glob("*/version_0"))
    results = json.loads((run / "ptq_gap.json").read_text())
    assert results["forgetting_survives"] is not flagged and results["status"] == ("failed" if flagged else "ok")
    for key in ("forget_extraction_fp", "forget_extraction_nf4", "ptq_gap_extraction_nf4", "public_ppl_fp",
                "public_ppl_nf4", "bin_crossing_fraction"):
        assert isinstance(results[key], float), key
    assert results["forget_extraction_fp_before"] == 1.0  # the tiny model's canaries were memorised
    assert results["forget_extraction_at_k_fp"] >= results["forget_extraction_fp"]
    assert 0.0 <= results["forget_mia_auc_rmia_nf4_adapter"] <= 1.0
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "metrics_card.md").is_file()
    report = (run / "report.html").read_text()  # the shipped config ends with the ReportCallback
    assert '<h3 id="unlearning">Unlearning and the PTQ gap</h3>\n<figure>' in report
    # 4-digit secrets could occur inside any logged float, so look for whole canary texts
    texts = [c.text for c in tiny_datamodule(model_dir).canaries.members]
    for path in run.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".ckpt"):
            assert not any(t.encode() in path.read_bytes() for t in texts), f"a canary leaked into {path}"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_an_update_that_changes_nothing_is_no_change_not_ok(model_dir, tmp_path):
    """lora.alpha = 0 scales every adapter update to nothing: the model ends bit-identical to the
    start, and the run says so (status no_change, non-zero exit) instead of reporting success."""
    from ortho_train.unlearn_module import UnlearningChangedNothing

    module = UnlearnModule(str(model_dir), mode="lora", loss="npo_gdr", lr=1e-2, guard_every_n_steps=0,
                           attribution_batches=0, lora=LoraAdapterConfig(rank=4, alpha=0))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[AdapterExportCallback()])
    with pytest.raises(UnlearningChangedNothing, match="unlearning changed nothing"):
        trainer.fit(module, datamodule=tiny_datamodule(model_dir))
    card = json.loads((tmp_path / "metrics_card.json").read_text())
    assert card["status"] == "no_change" and card["training"]["forget_nll_max_change"] < 1e-6


def test_an_update_that_moves_the_forget_set_is_ok(model_dir, tmp_path):
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo_gdr", lr=1e-2, guard_every_n_steps=0,
                           attribution_batches=0, lora=LoraAdapterConfig(rank=4, alpha=8))
    _fit(module, model_dir, tmp_path, steps=2, callbacks=[AdapterExportCallback()])
    card = json.loads((tmp_path / "metrics_card.json").read_text())
    assert card["status"] == "ok" and card["training"]["forget_nll_max_change"] > 1e-3
