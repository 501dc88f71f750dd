"""CanarySFTModule: phases, schedule, loss, guard rails."""
import math

import lightning as L
import pytest
import torch

from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig, load_causal_lm
from ortho_train.schedules import warmup_cosine
from ortho_train.sft_module import CanarySFTModule


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def _module(**kwargs):
    # a warm-up within the shortest public phase here (the default 50 steps is refused for public_steps=1)
    return CanarySFTModule(tiny_llama=TinyLlamaConfig(32, 2, 2, 64), **({"warmup_steps": 1} | kwargs))


def _datamodule():
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=2, num_holdout_canaries=4, num_reference_secrets=50)
    dm.setup("fit")
    return dm


class _StepProbe(L.Callback):
    """Records the learning rate and whether canaries counted, per step."""

    def __init__(self):
        self.lrs, self.phases = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.phases.append(module.in_canary_phase)


def test_phases_schedule_and_pre_canary_snapshot(tmp_path):
    module = _module(public_steps=4, lr=1e-2, sft_lr=1e-3, warmup_steps=2, sft_warmup_steps=1,
                     eval_during_validation=False)
    probe = _StepProbe()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[probe], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    dm = _datamodule()
    trainer.fit(module, datamodule=dm)
    assert probe.phases == [False] * 4 + [True] * 4
    # the public phase peaks at lr, the SFT phase at sft_lr
    assert max(probe.lrs[:4]) == pytest.approx(1e-2)
    assert max(probe.lrs[4:]) <= 1e-3 + 1e-12
    saved = load_causal_lm(tmp_path / "hf_model_pre_canary")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, module.pre_canary_state_dict[name]), name
    assert module.public_ppl_before_canaries is not None and math.isfinite(module.public_ppl_before_canaries)
    assert (tmp_path / "summary.json").is_file()


def _mixed_batch_and_trainer(module):
    """A public + canary batch of `_datamodule()` and a stand-in trainer at step 0 attached to
    `module` (set its `global_step` to move between the phases)."""
    dm = _datamodule()
    batch = {"public": next(iter(dm.public_train_dataloader())),
             "canary": next(iter(dm.train_dataloader()["canary"]))}

    class FakeTrainer:
        global_step = 0

    module._trainer = FakeTrainer()
    module.log = lambda *a, **k: None
    return batch, module._trainer


def test_warmup_ignores_canaries_and_sft_adds_them():
    module = _module(public_steps=1)
    batch, trainer = _mixed_batch_and_trainer(module)
    public_only = module.training_step(batch, 0)
    nll, tokens = module.nll_sum(batch["public"])
    assert public_only.item() == pytest.approx((nll / tokens).item())
    trainer.global_step = 1
    mixed = module.training_step(batch, 0)
    canary_nll, canary_tokens = module.nll_sum(batch["canary"])
    assert mixed.item() == pytest.approx(((nll + canary_nll) / (tokens + canary_tokens)).item())


def test_canary_phase_uses_the_first_public_windows_only():
    """canary_phase_public_windows = 1: the canary-phase loss is the token mean over the first
    public window and the canaries; the public phase still uses the whole public batch."""
    module = _module(public_steps=1, canary_phase_public_windows=1)
    batch, trainer = _mixed_batch_and_trainer(module)  # 2 public windows
    nll, tokens = module.nll_sum(batch["public"])
    assert module.training_step(batch, 0).item() == pytest.approx((nll / tokens).item())
    trainer.global_step = 1
    first = {key: value[:1] for key, value in batch["public"].items()}  # (2, T) -> (1, T)
    first_nll, first_tokens = module.nll_sum(first)
    canary_nll, canary_tokens = module.nll_sum(batch["canary"])
    expected = (first_nll + canary_nll) / (first_tokens + canary_tokens)
    assert module.training_step(batch, 0).item() == pytest.approx(expected.item())
    assert first_tokens < tokens  # the second window really was left out


@pytest.mark.parametrize("windows", [0, -2])
def test_canary_phase_public_windows_below_one_is_refused(windows):
    with pytest.raises(ValueError, match=rf"model\.init_args\.canary_phase_public_windows={windows}: must be ≥ 1"):
        _module(canary_phase_public_windows=windows)


def test_canary_phase_public_windows_above_the_batch_is_refused_at_fit_start(tmp_path):
    module = _module(public_steps=1, canary_phase_public_windows=3, eval_during_validation=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ValueError, match=r"canary_phase_public_windows \(3\) exceeds data.batch_size \(2\)"):
        trainer.fit(module, datamodule=_datamodule())
    assert not (tmp_path / "hf_model").exists()


def test_a_canary_warm_up_longer_than_the_canary_phase_warns_at_fit_start(tmp_path):
    module = _module(public_steps=1, sft_warmup_steps=5, eval_during_validation=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.warns(UserWarning, match=r"model\.init_args\.sft_warmup_steps=5 is longer than the canary phase "
                                         r"\(trainer\.max_steps - model\.init_args\.public_steps = 1 steps\)"):
        trainer.fit(module, datamodule=_datamodule())


def test_non_finite_loss_is_a_clear_error():
    module = _module(public_steps=1)
    dm = _datamodule()
    batch = {"public": next(iter(dm.public_train_dataloader()))}
    with torch.no_grad():
        module.model.lm_head.weight.fill_(float("nan"))

    class FakeTrainer:
        global_step = 0

    module._trainer = FakeTrainer()
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        module.training_step(batch, 0)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'byte' nor an existing"):
        CanarySFTModule(model_path=str(tmp_path / "nope"))
