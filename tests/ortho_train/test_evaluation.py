"""The shared memorisation evaluation on a tiny model with known outcomes."""
import pytest
import torch

from ortho_train import metrics
from ortho_train.datamodule import CanaryDataModule, pad_collate
from ortho_train.evaluation import evaluate_memorisation
from ortho_train.models import TinyLlamaConfig, build_tiny_llama


@pytest.fixture(scope="module")
def probe_and_model():
    dm = CanaryDataModule(seq_len=64, batch_size=4, val_windows=4, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=12, num_reference_secrets=300)
    dm.setup("fit")
    tok = dm.tokenizer
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(tok), tok.pad_token_id, tok.eos_token_id)
    return dm.probe, model


def test_pruned_reference_count_equals_full_scoring(probe_and_model):
    probe, model = probe_and_model
    prefix = probe.members.prefix_ids[0]
    refs = torch.stack(probe.reference_secret_ids)  # (R, S)
    full = metrics.secret_log_perplexity(model, prefix, refs)
    for threshold in (full.min().item() - 1, full.median().item(), full.max().item() + 1):
        expected = int((full < threshold).sum())
        assert metrics.count_references_below(model, prefix, threshold, refs) == expected


@pytest.mark.filterwarnings("ignore:TPR at FPR")
def test_memorised_secret_gets_maximal_exposure(probe_and_model):
    """Train the tiny model until member 0's secret is the most likely: exposure = log2|R_ref|."""
    probe, model = probe_and_model
    model = type(model)(model.config)
    model.load_state_dict(probe_and_model[1].state_dict())
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
