"""A head tied to the input embedding stays dense, so the α = 0 base file never sees a canary."""
import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers
from ortho_train.quantisation import PTQConfig, QuantConfig, quantised_copy
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve import SieveConfig, build_dual_stream_model, sieve_model
from ortho_train.sieve.artifacts import BASE_NAME, save_sieved
from ortho_train.sieve.isolation import IsolationConfig

TIED = TinyLlamaConfig(32, 2, 2, 64, tie_word_embeddings=True)


def test_a_tied_head_is_never_among_the_sieved_linears():
    model = build_tiny_llama(TIED, 40, 0, 1)
    with pytest.warns(UserWarning, match="tied to the input embedding"):
        layers = linear_layers(model, include_lm_head=True)
    assert "lm_head" not in layers and len(layers) == 14  # 2 blocks × 7 projections
    untied = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    assert "lm_head" in linear_layers(untied, include_lm_head=True)
    embedding = model.get_input_embeddings().weight.detach().clone()
    for deployed in (False, True):  # the table's NF4 reference row; a PTQ copy that skips nothing by name
        with pytest.warns(UserWarning, match="tied to the input embedding"):
            nf4 = quantised_copy(model, "nf4", PTQConfig(skip_modules=[]), include_lm_head=True,
                                 deployed_modules=deployed)
        assert torch.equal(nf4.get_input_embeddings().weight, embedding)  # not quantised through the head
        assert type(nf4.lm_head) is torch.nn.Linear and nf4.lm_head.weight is nf4.get_input_embeddings().weight
        down = nf4.model.layers[0].mlp.down_proj
        if deployed:
            assert type(down).__name__ == "Linear4bit"
        else:  # a dense linear holding the fake-quantised weight
            assert not torch.equal(down.weight, model.model.layers[0].mlp.down_proj.weight)
    with pytest.warns(UserWarning, match="tied to the input embedding"):  # INT4 rounds weights in place
        int4 = quantised_copy(model, "int4_rtn", PTQConfig(group_size=32, skip_modules=[]))
    assert torch.equal(int4.get_input_embeddings().weight, embedding)


def _isolated_tied_fit(tmp, canary_seed):
    torch.manual_seed(0)
    module = CanarySFTModule(
        tiny_llama=TIED, public_steps=3, lr=1e-2, sft_lr=2e-2, warmup_steps=1, sft_warmup_steps=1,
        eval_during_validation=False,
        isolation=IsolationConfig(support="saliency_canary", rho=0.05, quant=QuantConfig("gptq", 4, 32),
                                  calibration_batches=2, include_lm_head=True),
    )
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, deterministic=True)
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50,
                          canary_seed=canary_seed)
    with pytest.warns(UserWarning, match="tied"):
        trainer.fit(module, datamodule=dm)
    support = module.private_update.support
    layers = sieve_model(module.model, "isolated", SieveConfig(include_lm_head=True), supports=support.masks,
                         bases=support.bases)
    save_sieved(build_dual_stream_model(module.model, layers), tmp / "sieved")
    return module, load_file(tmp / "sieved" / BASE_NAME)


def test_tied_base_file_is_independent_of_the_secrets(tmp_path):
    a, base_a = _isolated_tied_fit(tmp_path / "a", canary_seed=1)
    b, base_b = _isolated_tied_fit(tmp_path / "b", canary_seed=2)
    assert a.probe.members.texts != b.probe.members.texts
    assert base_a.keys() == base_b.keys() and "model.embed_tokens.weight" in base_a
    for key, tensor in base_a.items():  # the same computation both runs: bit equality is the claim
        assert torch.equal(tensor, base_b[key]), f"{key} of the base file depends on the secrets"
    assert torch.equal(base_a["model.embed_tokens.weight"], a.pre_canary_state_dict["model.embed_tokens.weight"])
    assert "lm_head" not in a.private_update.support.masks
