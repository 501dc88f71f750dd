"""TOFU's evaluation of one model, and its summary against a retain-only model.

Per evaluation set (forget, retain, Real Authors, World Facts; `benchmarks_data.tofu`) the model
scores, for each question q (prompt `QAFormat.prompt(q)`):
- ℓ(answer), ℓ(reference) and ℓ(each perturbed answer) (`metrics.answer_scoring`: mean
  log-probability of the answer's tokens, the answer tag and, by default, EOS included);
- ROUGE-L recall of its greedy answer (prompt + answer tag, `max_new_tokens`, cut at EOS) against
  the true answer, on words (`metrics.rouge.rouge_tokens`; with `rouge_stemmer="porter"` the words
  are stemmed as TOFU's code does, with the published Porter stemmer `metrics.porter`; default none).
`summarise` turns these into the paper's numbers (`metrics.tofu`); `forget_quality` needs a
model trained on the retain split only, scored on the same forget set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ortho_train.benchmarks_data.records import BenchmarkDataError
from ortho_train.benchmarks_data.tofu import TofuQA
from ortho_train.measurement.benchmarks.config import TofuEvalConfig
from ortho_train.measurement.benchmarks.text_io import encode_pair, greedy_answers
from ortho_train.metrics.answer_scoring import answer_mean_logprobs
from ortho_train.metrics.porter import porter_stem
from ortho_train.metrics.rouge import text_rouge_l
from ortho_train.metrics.tofu import (answer_probability, forget_quality, model_utility, normalised_answer_probability,
                                      truth_ratio_score, truth_ratios)


@dataclass
class TofuSetScores:
    """One model on one evaluation set: mean log-probs (N,), (N,), (N, m) and ROUGE-L recalls (N)."""
    answer_logp: Tensor
    reference_logp: Tensor
    perturbed_logp: Tensor
    rouge_recall: list[float]

    @property
    def truth_ratios(self) -> Tensor:
        return truth_ratios(self.reference_logp, self.perturbed_logp)


def _mean_logps(model, tokenizer, cfg: TofuEvalConfig, pairs: list[tuple[str, str]]) -> Tensor:
    encoded = [encode_pair(tokenizer, cfg.qa_format.prompt(q), cfg.qa_format.answer(a), cfg.answer_eos)
               for q, a in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return answer_mean_logprobs(model, [ids for ids, _ in encoded], [start for _, start in encoded],
                                cfg.batch_size, pad)


def _perturbed_count(items: list[TofuQA], name: str) -> int:
    counts = {len(item.perturbed) for item in items}
    if len(counts) != 1:
        raise BenchmarkDataError(f"TOFU {name}: rows hold different numbers of perturbed answers {sorted(counts)}; "
                                 "the truth ratio needs the same number in every row")
    return counts.pop()


def score_set(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[TofuQA], name: str,
              cfg: TofuEvalConfig) -> TofuSetScores:
    """Score one evaluation set (see the module docstring)."""
    m = _perturbed_count(items, name)
    answer = _mean_logps(model, tokenizer, cfg, [(it.question, it.answer) for it in items])
    reference = _mean_logps(model, tokenizer, cfg, [(it.question, it.reference) for it in items])
    flat = _mean_logps(model, tokenizer, cfg, [(it.question, p) for it in items for p in it.perturbed])
    prompts = [cfg.qa_format.prompt(it.question) + cfg.qa_format.answer_start for it in items]
    generated = greedy_answers(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size)
    stem = porter_stem if cfg.rouge_stemmer == "porter" else None
    rouge = [text_rouge_l(g, it.answer, stem).recall for g, it in zip(generated, items)]
    return TofuSetScores(answer, reference, flat.reshape(len(items), m), rouge)  # perturbed (N, m)


def score_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sets: dict[str, list[TofuQA]],
                cfg: TofuEvalConfig) -> dict[str, TofuSetScores]:
    """Every evaluation set of `sets` ({"forget", "retain", "real_authors", "world_facts"})."""
    with torch.no_grad():
        return {name: score_set(model, tokenizer, items, name, cfg) for name, items in sets.items()}


def set_numbers(name: str, scores: TofuSetScores) -> dict[str, float]:
    """Probability, ROUGE-L recall and truth-ratio score of one set (TOFU's definitions:
    `metrics.tofu`; Real Authors / World Facts normalise the probability over the options)."""
    if name in ("real_authors", "world_facts"):
        probability = normalised_answer_probability(scores.answer_logp, scores.perturbed_logp)
    else:
        probability = answer_probability(scores.answer_logp)
    return {"probability": probability,
            "rouge_l_recall": sum(scores.rouge_recall) / len(scores.rouge_recall),
            "truth_ratio": truth_ratio_score(scores.truth_ratios, name)}


def summarise(scores: dict[str, TofuSetScores], retain_model: dict[str, TofuSetScores] | None) -> dict:
    """The paper's numbers for one model: per set {probability, rouge_l_recall, truth_ratio},
    `model_utility`, and `forget_quality` / `forget_quality_ks` when the retain-only model's
    forget-set scores are given (else None)."""
    per_set = {name: set_numbers(name, s) for name, s in scores.items()}
    out: dict = {"sets": per_set, "model_utility": model_utility(per_set),
                 "forget_quality": None, "forget_quality_ks": None}
    if retain_model is not None:
        p_value, statistic = forget_quality(scores["forget"].truth_ratios, retain_model["forget"].truth_ratios)
        out["forget_quality"], out["forget_quality_ks"] = p_value, statistic
    out["forget_truth_ratios"] = scores["forget"].truth_ratios.tolist()
    return out
