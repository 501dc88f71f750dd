"""Tiny canary fine-tunes with the separation table, fitted once per test session (cached)."""
import functools
import tempfile
from pathlib import Path

import lightning as L
import torch

from ortho_callbacks.separation import SeparationTableCallback
from ortho_train.measurement.separation import SeparationConfig
from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig
from ortho_train.ogd import OGDConfig
from ortho_train.sft_module import CanarySFTModule

TINY = TinyLlamaConfig(32, 2, 2, 64)


def table_callback(energy: float = 0.9) -> SeparationTableCallback:
    return SeparationTableCallback(table=SeparationConfig(energy=energy, barrier_batches=1, barrier_batch_size=2,
                                                          metrics=["extraction", "mia", "ppl"], group_size=32))


def fit(run_dir: Path, callbacks=(), **module_kwargs) -> CanarySFTModule:
    """3 public steps, 3 canary steps of a 2-block, 32-wide Llama on 64-token windows."""
    torch.manual_seed(0)
    module = CanarySFTModule(tiny_llama=TINY, public_steps=3, lr=1e-2, sft_lr=2e-2, warmup_steps=1,
                             sft_warmup_steps=1, eval_during_validation=False, weight_decay=0.1,
                             **module_kwargs)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=run_dir, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=0.5, callbacks=list(callbacks))
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50)
    trainer.fit(module, datamodule=dm)
    return module


@functools.lru_cache(maxsize=None)
def dense_fit() -> tuple[CanarySFTModule, SeparationTableCallback]:
    """Dense SFT with tracked displacements; the table's SVD split at energy 1.0."""
    callback = table_callback(energy=1.0)
    return fit(Path(tempfile.mkdtemp(prefix="dense_sep_")), [callback], track_displacements=True), callback


@functools.lru_cache(maxsize=None)
def ogd_fit() -> tuple[CanarySFTModule, SeparationTableCallback]:
    callback = table_callback()
    ogd = OGDConfig(subspace="flattest", fraction=0.5, kfac_batches=2)
    return fit(Path(tempfile.mkdtemp(prefix="ogd_sep_")), [callback], ogd=ogd), callback
