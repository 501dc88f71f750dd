"""TOFU end to end on a tiny byte-level model: answer log-probs and the truth ratio against a
direct computation from unpadded forwards, and the evaluation's summary numbers."""
import math

import pytest
import torch
from scipy.stats import ks_2samp

from ortho_train.benchmarks_data.tofu import load_tofu_eval_sets
from ortho_train.measurement.benchmarks import tofu_eval
from ortho_train.measurement.benchmarks.config import QAFormat, TofuEvalConfig
from ortho_train.measurement.benchmarks.text_io import encode_pair
from ortho_train.metrics.answer_scoring import answer_mean_logprobs
from ortho_train.models import load_causal_lm
from ortho_train.settings import SettingError
from ortho_train.tokenization import load_tokenizer
from tests.ortho_train.benchmark_fixtures import tiny_byte_model, write_tofu
from tests.ortho_train.metric_helpers import one_thread, tiny_llama  # noqa: F401


def direct_mean_logp(model, ids: torch.Tensor, start: int) -> float:
    """(1/|a|) Σ_t log p(ids_t | ids_<t) over t ≥ start, from one unpadded forward."""
    logp = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].double(), dim=-1)  # (T, V)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, ids.numel())) / (ids.numel() - start)


def test_answer_mean_logprobs_match_unpadded_forwards():
    model = tiny_llama()
    seqs = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([1, 2, 3]), torch.tensor([4, 4, 4, 4, 4, 4, 4])]
    starts = [2, 1, 6]
    got = answer_mean_logprobs(model, seqs, starts, batch_size=2)
    with torch.no_grad():
        want = [direct_mean_logp(model, s, i) for s, i in zip(seqs, starts)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="answer start 3 outside"):
        answer_mean_logprobs(model, [torch.tensor([1, 2, 3])], [3])


def test_pairs_are_encoded_as_tofu_does_with_the_answer_tag_and_eos():
    tokenizer = load_tokenizer("byte")
    fmt = QAFormat()
    ids, start = encode_pair(tokenizer, fmt.prompt("Who?"), fmt.answer("Me"), answer_eos=True)
    prompt = "Question: Who?\n"
    assert start == len(prompt)  # one token per byte, no BOS for the byte tokenizer
    assert tokenizer.decode(ids[start:], skip_special_tokens=False) == "Answer: Me</s>"


@pytest.fixture(scope="module")
def tofu_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu")
    model_dir = tiny_byte_model(root / "model", seed=0)
    return write_tofu(root / "data", rows=3), load_causal_lm(model_dir).eval(), load_tokenizer(model_dir)


def test_truth_ratio_end_to_end(tofu_setup):
    data, model, tokenizer = tofu_setup
    cfg = TofuEvalConfig(max_new_tokens=6, batch_size=4)
    sets = load_tofu_eval_sets("forget10", data)
    scores = tofu_eval.score_model(model, tokenizer, sets, cfg)
    item = sets["forget"][1]

    def ell(answer):
        ids, start = encode_pair(tokenizer, cfg.qa_format.prompt(item.question), cfg.qa_format.answer(answer), True)
        with torch.no_grad():
            return direct_mean_logp(model, ids, start)

    # R = (Π_j P̄(â_j))^{1/3} / P̄(ã), from three unpadded forwards per answer
    geo = math.exp(sum(ell(p) for p in item.perturbed) / 3)
    assert scores["forget"].truth_ratios[1].item() == pytest.approx(geo / math.exp(ell(item.reference)), rel=1e-4)
    assert scores["forget"].answer_logp[1].item() == pytest.approx(ell(item.answer), abs=1e-5)
    assert scores["world_facts"].perturbed_logp.shape == (3, 3)
    summary = tofu_eval.summarise(scores, retain_model=scores)
    assert summary["forget_quality"] == pytest.approx(1.0) and summary["forget_quality_ks"] == 0.0
    r = scores["retain"].truth_ratios
    assert summary["sets"]["retain"]["truth_ratio"] == pytest.approx(float((1 - r).clamp(min=0).mean()))
    assert 0 <= summary["model_utility"] <= 1 and all(0 <= x <= 1 for x in scores["forget"].rouge_recall)


def test_forget_quality_compares_two_models(tofu_setup, tmp_path):
    data, model, tokenizer = tofu_setup
    other = load_causal_lm(tiny_byte_model(tmp_path / "other", seed=1)).eval()
    cfg = TofuEvalConfig(max_new_tokens=2, limit=3)
    sets = load_tofu_eval_sets("forget10", data, limit=3)
    a, b = (tofu_eval.score_model(m, tokenizer, sets, cfg) for m in (model, other))
    summary = tofu_eval.summarise(a, retain_model=b)
    expected = ks_2samp(a["forget"].truth_ratios.numpy(), b["forget"].truth_ratios.numpy())
    assert summary["forget_quality"] == pytest.approx(expected.pvalue)
    assert tofu_eval.summarise(a, None)["forget_quality"] is None


def test_settings_are_refused_by_name():
    with pytest.raises(SettingError, match="--forget-split='forget20'"):
        TofuEvalConfig(forget="forget20")
    with pytest.raises(SettingError, match="--limit=0"):
        TofuEvalConfig(limit=0)
