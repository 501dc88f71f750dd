"""A tiny isolated DP-SGD canary fine-tune, shared by the DP training and DP table tests."""
import lightning as L
import pytest
import torch

from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig
from ortho_train.privacy import DPConfig
from ortho_train.quantisation import QuantConfig
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.isolation import IsolationConfig

@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Import into a test module: tiny models gain nothing from a second thread, and on a busy
    2-core machine every two-thread op waits for the other core (a table took 4x longer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


TINY = TinyLlamaConfig(32, 2, 2, 64)
STEPS, PUBLIC = 7, 3


def isolation_config(**kw):
    settings = dict(support="impact", rho=0.05, quant=QuantConfig("gptq", 4, 32), calibration_batches=2,
                    public_base_updates=True)
    return IsolationConfig(**(settings | kw))


def dp_config(**kw):
    return DPConfig(**(dict(noise_multiplier=1.0, delta=1e-2, max_grad_norm=0.5, expected_batch_size=2.0) | kw))


def dp_fit(tmp, canary_seed=1, dp=None, callbacks=(), isolation=None):
    torch.manual_seed(0)
    module = CanarySFTModule(
        tiny_llama=TINY, public_steps=PUBLIC, lr=1e-2, sft_lr=2e-2, warmup_steps=1, sft_warmup_steps=1,
        eval_during_validation=False, weight_decay=0.1, isolation=isolation or isolation_config(),
        dp=dp or dp_config(),
    )
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, deterministic=True,
                        callbacks=list(callbacks))
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50,
                          canary_seed=canary_seed)
    trainer.fit(module, datamodule=dm)
    return module
