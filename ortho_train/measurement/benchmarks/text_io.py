"""Texts in and out of a model for the benchmarks: prompt/answer encoding and greedy text answers.

Encoding follows the toolkit's convention (`ortho_train.tokenization`): the tokenizer's `<bos>`
first where its own encoding adds one (``leading_bos_id(..., "auto")``), then the text's tokens
without special tokens. A prompt/answer pair is encoded as TOFU's code does it: the whole text
``prompt + answer`` at once, the first ``len(encode(prompt))`` tokens counted as the prompt (so a
BPE merge across the boundary is scored as answer), and optionally the EOS token after the answer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ortho_train.metrics.extraction import greedy_continuation
from ortho_train.tokenization import encode_text, leading_bos_id


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> Tensor:
    """1-D ids of a prompt: `<bos>` where the tokenizer's encoding starts with one, then `text`."""
    ids = encode_text(tokenizer, text)
    bos = leading_bos_id(tokenizer, "auto")
    return ids if bos is None else torch.cat([torch.tensor([bos]), ids])


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str,
                answer_eos: bool) -> tuple[Tensor, int]:
    """(ids of prompt + answer [+ EOS], position of the first answer token)."""
    start = encode_prompt(tokenizer, prompt).numel()
    ids = encode_prompt(tokenizer, prompt + answer)
    if answer_eos and tokenizer.eos_token_id is not None:
        ids = torch.cat([ids, torch.tensor([tokenizer.eos_token_id])])
    if ids.numel() <= start:
        raise ValueError(f"an answer encodes to no tokens after its prompt ({answer[:40]!r}…)")
    return ids, start


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (MUSE's KnowMem post-processing)."""
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_new_tokens: int, stop_strings: Sequence[str] = (), batch_size: int = 8) -> list[str]:
    """The greedy continuation of each prompt as text: `max_new_tokens` argmax tokens, cut before
    the first EOS, decoded without special tokens, then cut at the first stop string.

    Prompts are grouped by token length and each group decoded unpadded
    (`metrics.extraction.greedy_continuation`), so padding never changes an answer.
    """
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(ids.numel(), []).append(i)
    answers = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for indices in by_length.values():
        stacked = torch.stack([encoded[i] for i in indices])  # (b, P)
        generated = greedy_continuation(model, stacked, max_new_tokens, batch_size)  # (b, n)
        for i, row in zip(indices, generated.tolist()):
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            text = tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            answers[i] = cut_at_stop(text, stop_strings)
    return answers
