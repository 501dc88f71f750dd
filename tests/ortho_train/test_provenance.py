"""A later stage refuses the model of a fine-tuning run that was stopped before its end, naming
the run's resume command (its numbers would look like the finished run's)."""
import json

import pytest

from ortho_train.provenance import UnfinishedRunError, check_same_canaries


def test_the_model_of_an_interrupted_run_is_refused_with_its_resume_command(tmp_path):
    (tmp_path / "hf_model").mkdir()
    resume = "python train.py fit --config runs/q/version_0/config.yaml --ckpt_path runs/q/version_0/checkpoints/x.ckpt"
    summary = {"status": "interrupted", "reason": "SIGTERM", "step": 6, "max_steps": 8, "resume_command": resume,
               "canary_fingerprint": "abc", "canary_settings": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UnfinishedRunError) as refused:
        check_same_canaries(tmp_path / "hf_model", {"canary_fingerprint": "abc", "canary_settings": {}})
    assert "step 6 of 8" in str(refused.value) and resume in str(refused.value)


def test_the_model_of_a_finished_run_with_the_same_canaries_passes(tmp_path):
    (tmp_path / "hf_model").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"canary_fingerprint": "abc", "canary_settings": {}}))
    check_same_canaries(tmp_path / "hf_model", {"canary_fingerprint": "abc", "canary_settings": {}})
