"""Token-level datasets and batches: public text windows, tokenised canaries, the evaluation probe,
and the collate functions that pad them.

A leading BOS token. Models pretrained with one at the start of every sequence (Llama, Gemma) are
far worse without it: Gemma 3 270M's perplexity on Shakespeare is 987.6 without and 94.5 with it on
64-token windows (docs/results.md, `benchmarks/bos_perplexity.py`). With `bos_id` set, every public
window is `[bos] + seq_len − 1 text tokens` and every canary's prefix starts with it, so the secret's
offsets follow `len(prefix_ids)` as before. `ortho_train.tokenization.leading_bos_id` decides it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ortho_train.corpus import CorpusError


def answer_collate(items, pad_token_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `(ids, answer_start, answer_end)` items; labels are −100 outside [start, end)."""
    longest = max(len(ids) for ids, _, _ in items) if length is None else length
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, start, end) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, start:end] = ids[start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_collate(sequences: Sequence[torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad 1-D token sequences into a causal-LM batch; padded labels are −100."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class TokenisedCanaries:
    """Canaries as token ids; `full_ids[i] = cat(prefix_ids[i], secret_ids[i], suffix_ids[i])`."""

    prefix_ids: list[torch.Tensor]
    secret_ids: list[torch.Tensor]
    full_ids: list[torch.Tensor]
    texts: list[str]  # full canary texts, for the zlib score only — never logged
    secret_texts: list[str]  # the secrets alone, for the zlib score of the secret span — never logged

    @classmethod
    def from_canaries(cls, canaries, encode: Callable[[str], torch.Tensor],
                      bos_id: int | None = None) -> "TokenisedCanaries":
        """Encode prefix, secret and suffix separately (the secret's tokens are exactly its own);
        `bos_id`: prepended to every prefix."""
        lead = torch.tensor([] if bos_id is None else [bos_id], dtype=torch.int64)  # (0,) or (1,)
        prefix, secret, full, texts, secret_texts = [], [], [], [], []
        for canary in canaries:
            p, s, x = torch.cat([lead, encode(canary.prefix)]), encode(canary.secret), encode(canary.suffix)
            prefix.append(p)
            secret.append(s)
            full.append(torch.cat([p, s, x]))
            texts.append(canary.text)
            secret_texts.append(canary.secret)
        return cls(prefix, secret, full, texts, secret_texts)

    def __len__(self) -> int:
        return len(self.full_ids)


def subset_canaries(canaries: TokenisedCanaries, indices: Sequence[int]) -> TokenisedCanaries:
    """The canaries at `indices`, in that order."""
    return TokenisedCanaries([canaries.prefix_ids[i] for i in indices], [canaries.secret_ids[i] for i in indices],
                             [canaries.full_ids[i] for i in indices], [canaries.texts[i] for i in indices],
                             [canaries.secret_texts[i] for i in indices])


@dataclass
class MemorisationProbe:
    """Members, holdout canaries, reference secrets and public validation windows."""

    members: TokenisedCanaries
    holdout: TokenisedCanaries
    reference_secret_ids: list[torch.Tensor]
    public_val: Dataset
    randomness_space_size: int
    pad_token_id: int

    def public_val_batches(self, batch_size: int = 32) -> Iterable[dict[str, torch.Tensor]]:
        return DataLoader(self.public_val, batch_size=batch_size, shuffle=False)


class PublicWindows(Dataset):
    """Non-overlapping windows of `seq_len` tokens over a token stream (labels = inputs); with
    `bos_id`, each window is `bos_id` followed by the next `seq_len − 1` tokens of the stream."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, limit: int | None = None, split: str = "train",
                 bos_id: int | None = None):
        body = seq_len - (bos_id is not None)
        count = len(tokens) // body if body >= 1 else 0
        if limit is not None:
            count = min(count, limit)
        if count < 1:
            fix = "lower data.seq_len or use a larger corpus" if body >= 1 else "raise data.seq_len above 1"
            if split == "val":
                fix += " (or raise data.val_fraction)"
            raise CorpusError(f"the corpus's {split} split has {len(tokens)} tokens, fewer than one window of "
                              f"data.seq_len={seq_len}: {fix}")
        windows = tokens[: count * body].view(count, body)  # (num_windows, body)
        if bos_id is not None:
            lead = torch.full((count, 1), bos_id, dtype=windows.dtype)  # (num_windows, 1)
            windows = torch.cat([lead, windows], dim=1)  # (num_windows, seq_len)
        self.windows = windows  # (num_windows, seq_len)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.windows[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class SequenceList(Dataset):
    """A list of token sequences (e.g. canaries), padded by `pad_collate` at batch time."""

    def __init__(self, sequences: list[torch.Tensor]):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sequences[index]
