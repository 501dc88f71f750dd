"""RMIA, extraction@k and the audit over a probe: the population, the reference, the suite's refusals."""
import math

import pytest
import torch

from ortho_train.attack_evaluation import (ReferenceScores, population_log_probs, rmia_evaluation, rmia_summary,
                                           sampled_extraction_rate)
from ortho_train.datamodule import CanaryDataModule
from ortho_train.evaluation import canary_scores, extraction_metrics
from ortho_train.measurement.attacks import AttackSettings, AttackSuite
from ortho_train.metrics.reference_mia import RMIAConfig, rmia_scores
from ortho_train.metrics.sampled_extraction import SampledExtractionConfig
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from tests.ortho_train.metric_helpers import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def probe_and_models():
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=6, num_reference_secrets=30)
    dm.setup("fit")
    tok = dm.tokenizer
    model, pre = (build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(tok), tok.pad_token_id, tok.eos_token_id,
                                   seed=s).eval() for s in (1, 2))
    return dm.probe, model, pre


@torch.no_grad()
def _mean_secret_logprob(model, prefix, secret):
    ids = torch.cat([prefix, secret]).unsqueeze(0)  # (1, P + S)
    logp = model(ids).logits.log_softmax(-1)[0, len(prefix) - 1:-1]  # (S, V): positions predicting the secret
    return logp.gather(-1, secret.unsqueeze(-1)).mean().item()


def test_population_is_reference_secrets_after_holdout_prefixes(probe_and_models):
    probe, model, _ = probe_and_models
    config = RMIAConfig(population=10, population_prefixes=3)
    got = population_log_probs(model, probe, config)
    assert got.shape == (10,)
    # secret j follows prefix j mod 3; the output is grouped by prefix: prefix 0 takes secrets 0, 3, 6, 9
    expected = _mean_secret_logprob(model, probe.holdout.prefix_ids[0], probe.reference_secret_ids[3])
    assert got[1].item() == pytest.approx(expected, abs=1e-5)


def test_rmia_of_a_probe_is_the_formula_over_loss_scores(probe_and_models):
    probe, model, pre = probe_and_models
    config = RMIAConfig(population=12, population_prefixes=2, fprs=(0.5, 0.01))
    reference = ReferenceScores.of(pre, probe, config)
    report, scores = rmia_evaluation(model, probe, reference, config)
    target = canary_scores(model, probe)
    expected = rmia_scores(target["members"]["loss"], reference.members, population_log_probs(model, probe, config),
                           reference.population, config.a, config.gamma)
    assert torch.equal(torch.floor(scores["members"] * 12) / 12, expected)  # the fraction, ties broken below 1/24
    assert ((scores["members"] - expected) * 24).lt(1).all() and (scores["members"] > expected).all()
    assert report["mia_tpr_at_1pct_fpr_rmia"] is None  # 6 holdouts · 0.01 < 1: unresolved
    assert report["mia_tpr_at_50pct_fpr_rmia"] is not None and report["mia_holdout_count"] == 6
    summary = rmia_summary(model, pre.state_dict(), probe, config=config)
    assert summary["mia_auc_rmia"] == report["mia_auc_rmia"] and summary["rmia_settings"]["a"] == config.a


def test_extraction_at_k_is_at_least_greedy_on_a_probe(probe_and_models):
    probe, model, _ = probe_and_models
    config = SampledExtractionConfig(k=8, temperature=2.0, top_k=0)
    greedy = extraction_metrics(model, probe.members)["extraction_rate"]
    at_k = sampled_extraction_rate(model, probe.members, config)
    assert greedy <= at_k == sampled_extraction_rate(model, probe.members, config)  # and reproducible


def test_suite_refuses_reference_attacks_without_a_reference(probe_and_models):
    probe, model, pre = probe_and_models
    with pytest.raises(ValueError, match="table.metrics.*reference model"):
        AttackSuite(probe, ["mia", "rmia"], AttackSettings(), None, "table.metrics")
    with pytest.raises(ValueError, match="reference model"):
        AttackSuite(probe, ["audit"], AttackSettings(), None)  # the audit guesses from RMIA by default
    loss_audit = AttackSettings()
    loss_audit.audit.score = "loss"
    found = AttackSuite(probe, ["audit"], loss_audit, None).measure(model)
    assert found["audit_canaries"] == 6 and 0 <= found["audit_epsilon_lb"] < math.inf
    assert set(AttackSuite(probe, ["rmia", "audit"], AttackSettings(), pre).measure(model)) >= {
        "mia_auc_rmia", "audit_epsilon_lb", "audit_delta"}


def test_scoring_a_dual_stream_model_with_a_sieved_lm_head(probe_and_models):
    """Exposure and the RMIA population score the kill-switch rows' models: with the LM head
    sieved (the quickstart's `include_lm_head: true`) the head is an `OrthoLinear`, which holds no
    `weight`; scoring must read its width elsewhere."""
    from ortho_train.evaluation import exposure_metrics
    from ortho_train.quantisation import QuantConfig
    from ortho_train.sieve.core import SieveConfig
    from ortho_train.sieve.model import build_dual_stream_model, quantised_layers

    probe, model, _ = probe_and_models
    layers = quantised_layers(model, SieveConfig(QuantConfig("rtn", 4, 32), include_lm_head=True), None)
    dual = build_dual_stream_model(model, layers)
    config = RMIAConfig(population=6, population_prefixes=2)
    assert population_log_probs(dual, probe, config).shape == (6,)
    found = exposure_metrics(dual, probe.members, probe.reference_secret_ids[:10], 1, skewnorm_references=0)
    assert 0.0 <= found["exposure_mean"] <= math.log2(10) + 1e-9
