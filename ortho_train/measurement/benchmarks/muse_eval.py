"""MUSE's evaluation of one model (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation
for Language Models", §3), as the benchmark's own code computes it:

- VerbMem on the forget set: greedy continuation (`verbmem_max_new_tokens`) of each `prompt`,
  ROUGE-L F1 on words against the ground truth `gt` cut to its first as many tokens;
- KnowMem on forget_qa and retain_qa: the few-shot prompt ``Question: q\\nAnswer: a\\n\\n`` over
  the *_icl examples, then ``Question: q\\nAnswer: ``; the greedy answer (`knowmem_max_new_tokens`)
  cut at a blank line or "Question", ROUGE-L F1 on words against `answer`;
- PrivLeak: Min-K% (k = `mink`, MUSE 40%) of every privleak forget and holdout text (first
  `max_length` tokens), AUC in MUSE's orientation (`metrics.muse.muse_privleak_auc`: holdout as
  the positive class), then ``(AUC − AUC_retrain)/AUC_retrain · 100`` against the same AUC of a
  model never trained on the forget set (`metrics.muse.privleak`). Negative = under-unlearning.

VerbMem and KnowMem are fractions in [0, 1] (the paper's tables print them ×100). ROUGE-L has no
stemming, as in MUSE's code. Departure: texts get `<bos>` only where the tokenizer's own encoding
adds one (`text_io.encode_prompt`), which for Llama-2 is what MUSE's code does too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ortho_train.benchmarks_data.muse import KnowMemItem, VerbMemItem
from ortho_train.measurement.benchmarks.config import MuseEvalConfig
from ortho_train.measurement.benchmarks.text_io import encode_prompt, greedy_answers
from ortho_train.metrics.logprobs import IGNORE_INDEX
from ortho_train.metrics.mia import mia_scores_from_stats
from ortho_train.metrics.muse import muse_privleak_auc
from ortho_train.metrics.rouge import text_rouge_l
from ortho_train.metrics.scoring import label_distribution_stats
from ortho_train.models import eval_mode
from ortho_train.tokenization import encode_text

KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


@dataclass
class MuseData:
    """The splits one evaluation reads (`benchmarks_data.muse`); None where not evaluated."""
    verbmem: list[VerbMemItem] | None = None
    knowmem: dict[str, tuple[list[KnowMemItem], list[KnowMemItem]]] | None = None  # split → (qa, icl)
    privleak: dict[str, list[str]] | None = None  # "forget" / "holdout" → texts


def verbmem_scores(model, tokenizer, items: list[VerbMemItem], cfg: MuseEvalConfig) -> list[float]:
    """Per-prompt ROUGE-L F1 of the greedy continuation against the truncated ground truth."""
    n = cfg.verbmem_max_new_tokens
    outputs = greedy_answers(model, tokenizer, [it.prompt for it in items], n, batch_size=cfg.batch_size)
    truths = [tokenizer.decode(encode_text(tokenizer, it.gt)[:n].tolist(), skip_special_tokens=True) for it in items]
    return [text_rouge_l(out, gt).f1 for out, gt in zip(outputs, truths)]


def knowmem_prompt(question: str, icl: list[KnowMemItem]) -> str:
    shots = "".join(f"Question: {ex.question}\nAnswer: {ex.answer}\n\n" for ex in icl)
    return f"{shots}Question: {question}\nAnswer: "


def knowmem_scores(model, tokenizer, qa: list[KnowMemItem], icl: list[KnowMemItem],
                   cfg: MuseEvalConfig) -> list[float]:
    """Per-question ROUGE-L F1 of the few-shot greedy answer against the true answer."""
    prompts = [knowmem_prompt(it.question, icl) for it in qa]
    outputs = greedy_answers(model, tokenizer, prompts, cfg.knowmem_max_new_tokens, KNOWMEM_STOPS, cfg.batch_size)
    return [text_rouge_l(out, it.answer).f1 for out, it in zip(outputs, qa)]


@torch.no_grad()
def mink_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                cfg: MuseEvalConfig) -> torch.Tensor:
    """Min-K% of each text (mean of its lowest ⌊k·n⌋ token log-probs; higher = more member-like)."""
    device = next(model.parameters()).device
    key = f"mink_{round(100 * cfg.mink)}"
    out = []
    with eval_mode(model):
        for begin in range(0, len(texts), cfg.batch_size):
            seqs = [encode_prompt(tokenizer, t)[:cfg.max_length] for t in texts[begin:begin + cfg.batch_size]]
            width = max(s.numel() for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)  # (b, T)
            mask = torch.zeros_like(ids)  # (b, T)
            for row, s in enumerate(seqs):
                ids[row, :s.numel()], mask[row, :s.numel()] = s, 1
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)  # (b, T)
            stats, _ = label_distribution_stats(model, ids.to(device), labels.to(device), mask.to(device))
            out.append(mia_scores_from_stats(stats, ks=(cfg.mink,))[key])
    return torch.cat(out)


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: MuseData, cfg: MuseEvalConfig) -> dict:
    """The metrics of `cfg.metrics` that `data` holds splits for: `verbmem_f`, `knowmem_f`,
    `knowmem_r` (means) and `privleak_auc` (MUSE's orientation; PrivLeak itself needs a reference)."""
    out: dict = {}
    if "verbmem_f" in cfg.metrics and data.verbmem is not None:
        scores = verbmem_scores(model, tokenizer, data.verbmem, cfg)
        out["verbmem_f"] = sum(scores) / len(scores)
    for metric, split in (("knowmem_f", "forget_qa"), ("knowmem_r", "retain_qa")):
        if metric in cfg.metrics and data.knowmem is not None and split in data.knowmem:
            scores = knowmem_scores(model, tokenizer, *data.knowmem[split], cfg)
            out[metric] = sum(scores) / len(scores)
    if "privleak" in cfg.metrics and data.privleak is not None:
        forget = mink_scores(model, tokenizer, data.privleak["forget"], cfg)
        holdout = mink_scores(model, tokenizer, data.privleak["holdout"], cfg)
        out["privleak_auc"] = muse_privleak_auc(forget, holdout)
    return out
