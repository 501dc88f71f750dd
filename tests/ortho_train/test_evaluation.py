"""The shared memorisation evaluation on a tiny model with known outcomes."""
import pytest
import torch

from ortho_train import metrics
from ortho_train.datamodule import CanaryDataModule, pad_collate
from ortho_train.evaluation import canary_scores, evaluate_memorisation, exposure_histogram, exposure_reference_histogram
from ortho_train.models import TinyLlamaConfig, build_tiny_llama


@pytest.fixture(scope="module")
def probe_and_model():
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=4, val_windows=4, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=12, num_reference_secrets=300)
    dm.setup("fit")
    tok = dm.tokenizer
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(tok), tok.pad_token_id, tok.eos_token_id)
    return dm.probe, model


def _between_scores(scores: torch.Tensor) -> float:
    """A threshold near the median, midway in the widest of the 21 gaps around it between
    adjacent distinct scores: the pruned path scores references in other batches (another
    float order, ~1e-6 bits), so a threshold equal to a score could count it either way."""
    ordered = scores.unique()  # sorted, distinct
    middle = len(ordered) // 2
    window = ordered[middle - 10:middle + 11]
    gap = int((window[1:] - window[:-1]).argmax())
    return float((window[gap] + window[gap + 1]) / 2)


def test_pruned_reference_count_equals_full_scoring(probe_and_model):
    probe, model = probe_and_model
    prefix = probe.members.prefix_ids[0]
    refs = torch.stack(probe.reference_secret_ids)  # (R, S)
    full = metrics.secret_log_perplexity(model, prefix, refs)
    for threshold in (full.min().item() - 1, _between_scores(full), full.max().item() + 1):
        expected = int((full < threshold).sum())
        assert metrics.count_references_below(model, prefix, threshold, refs) == expected


def test_reference_levels_with_more_heads_than_half_the_survivors_are_skipped(probe_and_model):
    """A level of 3 digits (≤ 300 distinct heads of 300 references) is not scored: the model runs
    as often as with level 1 alone, and the count stays exact."""
    probe, model = probe_and_model
    prefix = probe.members.prefix_ids[0]
    refs = torch.stack(probe.reference_secret_ids)  # (R, S)
    threshold = _between_scores(metrics.secret_log_perplexity(model, prefix, refs))
    calls, counts, forwards = [], [], []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        for levels in ((1,), (1, 3)):
            calls.clear()
            counts.append(metrics.count_references_below(model, prefix, threshold, refs, levels=levels))
            forwards.append(len(calls))
    finally:
        hook.remove()
    assert counts[0] == counts[1] == int((metrics.secret_log_perplexity(model, prefix, refs) < threshold).sum())
    assert forwards[0] == forwards[1]


def _memorised(probe, model):
    """A copy of `model` trained until every member secret token has probability > 1/2."""
    start = model
    model = type(start)(start.config)
    model.load_state_dict(start.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = pad_collate(probe.members.full_ids, probe.pad_token_id)
    members = probe.members
    for _ in range(600):
        out = model(**batch)
        # stop once every secret token has probability > 1/2 given what precedes it: each secret is
        # then the unique greedy continuation of its prefix, so it outranks every other secret
        probs = out.logits.detach().softmax(-1)  # (B, T, V)
        if min(float(probs[i, len(p) - 1 + torch.arange(len(s)), s].min())
               for i, (p, s) in enumerate(zip(members.prefix_ids, members.secret_ids))) > 0.5:
            break
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def memorised(probe_and_model):
    return _memorised(*probe_and_model)


@pytest.mark.filterwarnings("ignore:TPR at FPR")
def test_memorised_secret_gets_maximal_exposure(probe_and_model, memorised):
    """Train the tiny model until member 0's secret is the most likely: exposure = log2|R_ref|."""
    probe, model = probe_and_model[0], memorised
    found = evaluate_memorisation(model, probe)
    assert found["extraction_rate"] == 1.0
    assert found["exposure_mean"] == pytest.approx(found["exposure_max_measurable"])
    assert found["exposure_max_measurable"] == pytest.approx(torch.log2(torch.tensor(300.0)).item())
    assert found["holdout_extraction_rate"] == 0.0
    assert found["mia_auc_loss"] == pytest.approx(1.0, abs=1e-6)  # 3 memorised members vs 12 unseen holdout canaries
    assert found["public_ppl"] > 1.0


@pytest.mark.filterwarnings("ignore:TPR at FPR")
def test_skewnorm_skipped_on_request_leaves_the_exact_rank(probe_and_model):
    """Tables show the exact rank only: `skewnorm_references=0` drops the fit, not the rank."""
    probe, model = probe_and_model
    full = evaluate_memorisation(model, probe, include=("exposure",))
    exact_only = evaluate_memorisation(model, probe, include=("exposure",), skewnorm_references=0)
    assert exact_only["exposure_mean"] == full["exposure_mean"]
    assert exact_only["exposure_min"] == full["exposure_min"]
    assert exact_only["exposure_skewnorm_mean"] is None
    assert "skewnorm_references=0" in exact_only["exposure_skewnorm_refused"]
    assert full["exposure_skewnorm_mean"] is not None or "exposure_skewnorm_refused" in full


@pytest.mark.parametrize("trained", [False, True], ids=["random", "memorised"])
def test_teacher_forced_check_is_greedy_exact_match(probe_and_model, memorised, trained):
    """`secret_is_argmax` of the MIA pass agrees with greedy decoding canary by canary, for
    members and holdouts; the table's holdout rate (decode_holdout=False) is the decoded one."""
    probe = probe_and_model[0]
    model = memorised if trained else probe_and_model[1]
    scores = canary_scores(model, probe)
    # Two float orders (full-sequence pass, cached decoding) meet only through argmax decisions:
    # the memorised model's secret tokens have probability > 1/2 (no near-tie), and for the random
    # model an outcome flips only if the argmax hits the secret at every position on one side.
    for canaries, part in ((probe.members, "members"), (probe.holdout, "holdout")):
        decoded = [bool(torch.equal(metrics.greedy_continuation(model, p[None], len(s))[0], s))
                   for p, s in zip(canaries.prefix_ids, canaries.secret_ids)]
        assert scores[part]["secret_is_argmax"].tolist() == decoded
    assert all(scores["members"]["secret_is_argmax"].tolist()) == trained
    decoded_rates = evaluate_memorisation(model, probe, include=("extraction",))
    forced_rates = evaluate_memorisation(model, probe, include=("extraction", "mia"), decode_holdout=False)
    assert forced_rates["holdout_extraction_rate"] == decoded_rates["holdout_extraction_rate"]
    assert "holdout_symbol_accuracy" in decoded_rates and "holdout_symbol_accuracy" not in forced_rates
    assert forced_rates["mia_auc_loss"] == evaluate_memorisation(model, probe, include=("mia",))["mia_auc_loss"]


def test_exposure_histogram_reuses_the_skewnorm_fit_scores(probe_and_model):
    """The run summary's histogram pools the scores the skew-normal exposure already computed:
    the same calls in the same order as scoring the contexts afresh, so the same numbers."""
    probe, model = probe_and_model
    fits = []
    evaluate_memorisation(model, probe, include=("exposure",), fit_scores=fits, skewnorm_references=300)
    assert len(fits) == len(probe.members) and all(len(references) == 300 for _, references in fits)
    assert exposure_histogram(fits[:2]) == exposure_reference_histogram(model, probe, contexts=2, references=300)


def test_scores_do_not_depend_on_the_logit_budget(probe_and_model, monkeypatch):
    """A large vocabulary shrinks the batches (`batch_within_logit_budget`) of a model whose head
    cannot be chunked, and chunks the head of one that can (`metrics.scoring`); the numbers stay."""
    probe, model = probe_and_model
    prefix, secrets = probe.members.prefix_ids[0], torch.stack(probe.reference_secret_ids[:40])
    wide = canary_scores(model, probe)
    wide_lp = metrics.secret_log_perplexity(model, prefix, secrets)
    monkeypatch.setattr("ortho_train.metrics.logprobs.LOGIT_BUDGET_BYTES", 1)  # one sequence per batch
    monkeypatch.setattr("ortho_train.metrics.scoring.split_causal_lm", lambda model: None)  # no chunking
    narrow = canary_scores(model, probe)
    narrow_lp = metrics.secret_log_perplexity(model, prefix, secrets)
    for group in ("members", "holdout"):
        for name, value in wide[group].items():
            assert torch.allclose(value.double(), narrow[group][name].double(), atol=1e-4), (group, name)
    assert torch.allclose(wide_lp, narrow_lp, atol=1e-4)
    monkeypatch.undo()
    monkeypatch.setattr("ortho_train.metrics.scoring.DEFAULT_LOGIT_BYTES", 1)  # the head one row at a time
    chunked, chunked_lp = canary_scores(model, probe), metrics.secret_log_perplexity(model, prefix, secrets)
    for group in ("members", "holdout"):
        for name, value in wide[group].items():
            assert torch.allclose(value.double(), chunked[group][name].double(), atol=1e-4), (group, name)
    assert torch.allclose(wide_lp, chunked_lp, atol=1e-4)
