"""Kill -9, then `--ckpt_path`: the resumed run ends with the uninterrupted run's numbers.

Each test runs train.py three times in one working directory (one canary key), one thread each:
uninterrupted (version_0, in the test's own process); killed with SIGKILL one step after a
checkpoint (version_1, a fresh process); resumed from that checkpoint, which must write into
version_1 again: in another fresh process (the slow tests, as a user resumes) or in the test's
process (the fast one: the state it resumes from is still only what the killed process wrote).
Same machine, seed and thread count, so the resumed run's results must equal the uninterrupted
run's exactly (wall-clock entries aside).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.resume_helpers import (REPO, checkpoint_every, killer, results, train, train_in_this_process,
                                  write_config)

CHECKPOINT_AT, KILL_AT = 5, 6  # the killed run loses step 6 and must redo it


def _sft_config(**model) -> dict:
    """configs/tiny.yaml, 8 steps (3 public), validation at 4 and 8 (one batch), 50 reference secrets,
    a checkpoint every 5 steps."""
    config = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    config["trainer"].update(max_steps=8, val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0)
    config["trainer"]["callbacks"] = [checkpoint_every(CHECKPOINT_AT)]  # no report, no learning-rate monitor
    config["model"]["init_args"].update(public_steps=3, eval_during_validation=False, **model)
    config["data"].update(num_reference_secrets=50)
    return config


def _kill_and_resume(workdir: Path, config: dict, name: str, kill_at: int = KILL_AT,
                     checkpoint_at: int = CHECKPOINT_AT, resume_in_this_process: bool = False) -> tuple[Path, Path]:
    """Run `config` uninterrupted, then killed at `kill_at`, then resumed; (uninterrupted, resumed) run dirs."""
    plain = write_config(workdir / "run.yaml", config)
    doomed = copy.deepcopy(config)
    doomed["trainer"]["callbacks"].append(killer(kill_at))
    train_in_this_process(workdir, plain)  # the reference; the killed run is a fresh process
    train(workdir, write_config(workdir / "killed.yaml", doomed), killed=True)
    runs = workdir / "runs" / name
    checkpoint = runs / "version_1" / "checkpoints" / f"step={checkpoint_at}.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in (runs / "version_1").rglob("*"))
    resume = train_in_this_process if resume_in_this_process else train
    resume(workdir, plain, f"--ckpt_path={checkpoint}")
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["version_0", "version_1"]  # no new version
    return runs / "version_0", runs / "version_1"


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_dense_canary_sft_resumes_to_the_uninterrupted_numbers(tmp_path):
    plain, resumed = _kill_and_resume(tmp_path, _sft_config(), "tiny", resume_in_this_process=True)
    assert results(resumed / "summary.json") == results(plain / "summary.json")
    _same_weights(resumed / "hf_model/model.safetensors", plain / "hf_model/model.safetensors")
    # the checkpoint carries the public (pre-canary) model the pre_sft and delta rows start from
    saved = torch.load(resumed / f"checkpoints/step={CHECKPOINT_AT}.ckpt", map_location="cpu", weights_only=False)
    public = load_file(plain / "hf_model_pre_canary/model.safetensors")
    assert {k: v for k, v in saved["pre_canary_state_dict"].items() if k in public}.keys() == public.keys()
    for key, value in public.items():
        assert torch.equal(saved["pre_canary_state_dict"][key], value), key


@pytest.mark.slow  # ~100 s on one loaded core (three runs)
def test_dense_canary_sft_resumes_from_the_end_of_a_canary_pass(tmp_path):
    """Checkpoint after step 4: the canary loader (4 members, 2 a batch) has handed out the last
    batch of its pass, so the resumed run draws the next pass's seed from the restored global
    generator, where the uninterrupted run drew it."""
    config = _sft_config()
    config["trainer"]["callbacks"] = [checkpoint_every(4)]
    plain, resumed = _kill_and_resume(tmp_path, config, "tiny", kill_at=6, checkpoint_at=4)
    saved = torch.load(resumed / "checkpoints/step=4.ckpt", map_location="cpu", weights_only=False)
    canary = next(s for s in saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] if s["name"] == "canary")
    assert (canary["pass"], canary["batches"]) == (1, 2)  # at the end of its second pass
    assert results(resumed / "summary.json") == results(plain / "summary.json")
    _same_weights(resumed / "hf_model/model.safetensors", plain / "hf_model/model.safetensors")


@pytest.mark.slow  # ~100 s on one loaded core (three runs)
def test_isolated_canary_sft_resumes_to_the_uninterrupted_numbers(tmp_path):
    isolation = {"support": "impact", "rho": 0.1, "calibration_batches": 2,
                 "quant": {"method": "rtn", "bits": 4, "group_size": 32}}
    plain, resumed = _kill_and_resume(tmp_path, _sft_config(isolation=isolation), "tiny")
    summary = results(resumed / "summary.json")
    assert summary == results(plain / "summary.json")
    assert summary["isolation"]["off_support_max_drift"] == 0.0  # the resumed run kept the support's freeze
    _same_weights(resumed / "hf_model/model.safetensors", plain / "hf_model/model.safetensors")


@pytest.mark.slow
def test_isolated_sft_with_public_base_updates_resumes_across_the_base_freeze(tmp_path):
    """Checkpoint before the base is re-quantised and frozen (step 5 of 3 + 5 canary steps): the
    resumed run draws its calibration batches from the restored global generators."""
    isolation = {"support": "impact", "rho": 0.1, "calibration_batches": 2, "public_base_updates": True,
                 "public_updates_fraction": 0.8, "quant": {"method": "rtn", "bits": 4, "group_size": 32}}
    plain, resumed = _kill_and_resume(tmp_path, _sft_config(isolation=isolation), "tiny", kill_at=7)
    assert results(resumed / "summary.json") == results(plain / "summary.json")


def _unlearn_config(model_dir: Path) -> dict:
    """configs/unlearn_lora_npo_gdr.yaml on the tiny memorised model: 6 steps, periodic PTQ gaps and
    guard checks every 2 steps, a checkpoint every 3."""
    from tests.ortho_train.unlearn_helpers import DATA

    config = yaml.safe_load((REPO / "configs/unlearn_lora_npo_gdr.yaml").read_text())
    config["trainer"].update(max_steps=6, enable_checkpointing=True)
    callbacks = [c for c in config["trainer"]["callbacks"] if "Report" not in c["class_path"]]
    for callback in callbacks:
        if callback["class_path"].endswith("PTQGapCallback"):
            callback["init_args"].update(every_n_steps=2, fail_on_gap=False, formats=["nf4", "int4_rtn"])
    config["trainer"]["callbacks"] = callbacks + [checkpoint_every(3)]
    config["model"]["init_args"].update(model_path=str(model_dir), guard_every_n_steps=2, lr=1e-2,
                                        lora={"rank": 4, "alpha": 8})
    config["data"].update(DATA, canary_key_file=None)  # the tiny model's canaries follow the seed
    return config


@pytest.mark.slow  # ~100 s of CPU (memorised model, three runs with PTQ copies)
def test_lora_unlearning_resumes_to_the_uninterrupted_numbers(tmp_path, tmp_path_factory):
    from tests.ortho_train.unlearn_helpers import cached_tiny_canary_model

    model_dir = cached_tiny_canary_model(tmp_path_factory)
    plain, resumed = _kill_and_resume(tmp_path, _unlearn_config(model_dir), "unlearn_lora_npo_gdr",
                                      kill_at=4, checkpoint_at=3)
    final = results(resumed / "ptq_gap.json")
    assert final == results(plain / "ptq_gap.json")
    assert final["forget_extraction_fp_before"] == 1.0  # measured on the starting model, kept through the kill
    assert results(resumed / "ptq_gap_step4.json") == results(plain / "ptq_gap_step4.json")
    card, plain_card = results(resumed / "metrics_card.json"), results(plain / "metrics_card.json")
    assert card["training"] == plain_card["training"]  # retain perplexity at start and end, CAD, steps
    assert card["training"]["cad"] is not None and card["ptq_table"] == plain_card["ptq_table"]
