"""`model_path=<file>.gguf`: the model and tokenizer of a GGUF file, dequantised, saved like any model."""
import pytest
import torch

from ortho_train.gguf_checkpoint import load_gguf_tokenizer
from ortho_train.models import head_is_tied, load_causal_lm
from ortho_train.tokenization import load_tokenizer
from tests.ortho_train.gguf_fixtures import write_tiny_llama_gguf

pytest.importorskip("gguf")


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def gguf_model(request, tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_llama_gguf(path, tied=request.param), request.param


def test_loads_as_a_plain_float_model_with_the_file_weights(gguf_model, monkeypatch):
    import transformers.integrations.gguf.kernels as gguf_kernels

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the hub for a GGUF kernel")

    monkeypatch.setattr(gguf_kernels, "get_gguf_kernel", no_hub)
    path, tensors, tied = gguf_model
    model = load_causal_lm(path)
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "hf_quantizer", None)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(tensors["blk.1.ffn_down.weight"]))
    assert head_is_tied(model) is tied
    if not tied:
        assert torch.equal(model.get_output_embeddings().weight, torch.from_numpy(tensors["output.weight"]))


def test_saves_and_reloads_as_a_directory_with_the_same_outputs(gguf_model, tmp_path):
    path, _, tied = gguf_model
    model = load_causal_lm(path).eval()
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_causal_lm(tmp_path / "saved").eval()
    ids = torch.tensor([[1, 262, 100, 101, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)
    assert head_is_tied(reloaded) is tied


def test_tokenizer_round_trips_text_and_has_a_pad_token(gguf_model):
    path, _, _ = gguf_model
    tokenizer = load_tokenizer(path)
    ids = tokenizer("the code is 4711", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "the code is 4711"
    assert tokenizer.pad_token_id is not None and len(tokenizer) == 265
    assert load_tokenizer(path) is not tokenizer and load_gguf_tokenizer(path) is load_gguf_tokenizer(path)


def test_missing_or_damaged_files_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf.* not found"):
        load_causal_lm(tmp_path / "missing.gguf")
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ValueError, match="could not load the GGUF model .*damaged.gguf"):
        load_causal_lm(damaged)
