"""Shared by the unlearning and callback tests: a tiny Llama that has memorised its canaries.

Trained directly (no Lightning) on the data module's member canaries mixed with public
windows until greedy decoding reproduces every secret; a few seconds on one CPU core.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ortho_train.datamodule import CanaryDataModule, pad_collate
from ortho_train.evaluation import extraction_metrics
from ortho_train.metrics import token_logprobs
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.tokenization import build_byte_tokenizer

@contextmanager
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a busy core
    makes every two-thread op wait for it (measured here: 87 s instead of 8 s for the fixture)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def single_thread():
    """Import into a test module to run its tests single-threaded."""
    with one_thread():
        yield


DATA = dict(canary_secrets="seed", seq_len=64, batch_size=4, canary_batch_size=4, val_windows=4, secret_length=4, num_member_canaries=4,
            num_holdout_canaries=16, num_reference_secrets=100, canary_seed=7)
TINY = TinyLlamaConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)


def tiny_datamodule(model_dir: str | Path = "byte", **overrides) -> CanaryDataModule:
    dm = CanaryDataModule(tokenizer=str(model_dir), **(DATA | {"train_split": "unlearn"} | overrides))
    dm.setup("fit")
    return dm


def train_tiny_canary_model(out_dir: Path, max_steps: int = 400, extra_steps: int = 100) -> Path:
    """Save a tiny Llama that extracts 100% of `DATA`'s member canaries to `out_dir`."""
    dm = tiny_datamodule()
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_llama(TINY, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    canaries = pad_collate(dm.probe.members.full_ids, tokenizer.pad_token_id)
    public = iter(dm.public_train_dataloader())
    memorised_at = None
    for step in range(max_steps):
        batch = next(public)
        nll = 0.0
        for part in (batch, canaries):
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            logp, mask = token_logprobs(logits, part["labels"])
            nll = nll - logp.sum() / mask.sum()
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
        if memorised_at is None and step % 25 == 24:
            if extraction_metrics(model, dm.probe.members)["extraction_rate"] == 1.0:
                memorised_at = step  # keep training a while so the memory is not marginal
        if memorised_at is not None and step >= memorised_at + extra_steps:
            break
    assert extraction_metrics(model, dm.probe.members)["extraction_rate"] == 1.0, "tiny model did not memorise"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_CACHE: dict[str, Path] = {}


def cached_tiny_canary_model(tmp_path_factory) -> Path:
    """One memorised tiny model per test session (pass pytest's `tmp_path_factory`).

    Under pytest-xdist the workers share it: the first to need it trains it into the session's
    common temporary directory, holding a file lock that the others wait on (training is seeded
    and single-threaded, so whichever worker trains it, it is the same model).
    """
    if "model" not in _CACHE:
        shared = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            shared = shared.parent  # the session's directory, above the per-worker ones
        target = shared / "tiny_canary_model"
        with open(shared / "tiny_canary_model.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (target / "config.json").is_file():
                with one_thread():
                    staging = Path(tempfile.mkdtemp(dir=shared))
                    train_tiny_canary_model(staging)
                    staging.rename(target)
        _CACHE["model"] = target
    return _CACHE["model"]
