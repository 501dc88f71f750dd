"""Loading a sieved model without an fp32 copy: meta skeleton, streamed tensors, the tied head
stored once, and the 8-bit embedding / head at save or at load, on Llama, Qwen2 and Gemma 3."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from ortho_kernels import OrthoStream, QuantisedBase
from ortho_kernels.int8_rows import dequantise_rows_int8, weight_error_bound
from ortho_train.export.source import read_sieved
from ortho_train.int8_embedding import Int8Head
from ortho_train.models import linear_layers
from ortho_train.ortho_linear import ortho_layers
from ortho_train.settings import SettingError
from ortho_train.sieve import SievedLayer, build_dual_stream_model, load_sieved, save_sieved
from ortho_train.sieve.artifacts import BASE_NAME, CONFIG_NAME, SieveArtifactError, _sha256
from ortho_train.sieve.empty_model import empty_causal_lm

VOCAB = 96
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SIZES, num_key_value_heads=1, tie_word_embeddings=True),
    "gemma3": lambda: Gemma3TextConfig(**SIZES, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"],
                                       tie_word_embeddings=True),
}
IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 2, 4]])


def _sieved(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    layers = {}
    for name, linear in linear_layers(model).items():
        base = QuantisedBase.from_dense(linear.weight.detach(), 4, 32)
        ortho = OrthoStream.top_fraction(linear.weight.detach() - base.dequantise(), 0.05)
        layers[name] = SievedLayer(base, ortho, {})
    return build_dual_stream_model(model, layers).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    model = _sieved(request.param)
    return request.param, model, save_sieved(model, tmp_path_factory.mktemp(request.param) / "sieved")


@torch.no_grad()
def test_load_reproduces_the_model_with_no_tensor_left_on_meta(saved):
    arch, model, path = saved
    loaded = load_sieved(path, weight_cache=True)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not [n for n, t in tensors.items() if t.device.type == "meta"]
    assert all(layer.weight_cache for layer in ortho_layers(loaded).values())
    base_only = load_sieved(path, with_ortho=False)  # empty ortho buffers: real, not meta
    assert all(m.ortho_values.device.type == "cpu" for m in ortho_layers(base_only).values())
    tied = arch != "llama"
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied


def test_the_skeleton_has_meta_parameters_and_real_buffers(saved):
    arch, model, path = saved
    config = json.loads((path / CONFIG_NAME).read_text())["model_config"]
    skeleton = empty_causal_lm(config)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    built = dict(model.named_buffers())
    for name, buffer in skeleton.named_buffers():  # RoPE tables, Gemma's embedding scale
        assert buffer.device.type == "cpu" and torch.equal(buffer, built[name]), name


def test_a_tied_head_is_stored_once_and_old_files_with_both_keys_still_load(saved, tmp_path):
    arch, model, path = saved
    if arch == "llama":
        pytest.skip("untied head")
    with safe_open(str(path / BASE_NAME), "pt") as f:
        keys = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    old = tmp_path / "old"  # the earlier layout: the head's copy beside the embedding's
    old.mkdir()
    for name in ("ortho.safetensors", CONFIG_NAME):
        (old / name).write_bytes((path / name).read_bytes())
    save_file(keys | {"lm_head.weight": keys["model.embed_tokens.weight"].clone()}, old / BASE_NAME, metadata=meta)
    config = json.loads((old / CONFIG_NAME).read_text())
    config["files"]["base"]["sha256"] = _sha256(old / BASE_NAME)
    del config["embedding"]  # written before the embedding format was recorded
    (old / CONFIG_NAME).write_text(json.dumps(config))
    head_bytes = VOCAB * SIZES["hidden_size"] * 4
    assert (old / BASE_NAME).stat().st_size - (path / BASE_NAME).stat().st_size >= head_bytes
    loaded = load_sieved(old)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


@torch.no_grad()
def test_int8_tables_at_save_and_at_load_agree(saved, tmp_path):
    arch, model, path = saved
    int8_dir = save_sieved(model, tmp_path / "int8", embedding="int8")
    at_save, at_load = load_sieved(int8_dir), load_sieved(path, embedding="int8")
    assert torch.equal(at_save(IDS).logits, at_load(IDS).logits)
    table = model.get_input_embeddings().weight.detach()
    head_bytes = 0 if arch != "llama" else VOCAB * SIZES["hidden_size"] * 4
    saved_bytes = (path / BASE_NAME).stat().st_size - (int8_dir / BASE_NAME).stat().st_size
    assert saved_bytes >= (table.numel() * 3 - VOCAB * 4) + head_bytes * 3 // 4 - 1024  # 1024: headers
    for loaded in (at_save, at_load):
        emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
        assert isinstance(emb, type(model.get_input_embeddings())) and isinstance(head, Int8Head)
        assert (head.weight_int8 is emb.weight_int8) == (arch != "llama")
        deq = dequantise_rows_int8(emb.weight_int8, emb.weight_scale)
        assert ((deq - table).abs() <= weight_error_bound(emb.weight_scale)[:, None]).all()
        want = model.get_input_embeddings()(IDS) * (deq[IDS] / table[IDS]).nan_to_num(1.0)  # scale kept
        assert torch.allclose(emb(IDS), want, rtol=1e-5, atol=1e-6)
    out = at_save.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)
    with pytest.raises(SieveArtifactError, match="saved with embedding='int8'"):
        load_sieved(int8_dir, embedding="float")
    with pytest.raises(SieveArtifactError, match="the exporters write float tables"):
        read_sieved(int8_dir)


def test_bad_embedding_settings_name_the_setting(saved, tmp_path):
    _, model, path = saved
    with pytest.raises(SettingError, match="load_sieved.embedding='int4'"):
        load_sieved(path, embedding="int4")
    with pytest.raises(SettingError, match="save_sieved.embedding='fp8'"):
        save_sieved(model, tmp_path / "x", embedding="fp8")
