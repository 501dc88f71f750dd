"""Gemma 3 GGUF export: a tiny sieved Gemma3ForCausalLM (q4_0 base) read back with gguf.GGUFReader and
through transformers' GGUF loader, against the toolkit's α = 0 model."""
import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, quants

from ortho_train.export import export, read_sieved
from ortho_train.gguf_checkpoint import load_gguf_causal_lm
from ortho_train.sieve import load_sieved
from tests.ortho_train.export_helpers import save_tiny_sieved

pytestmark = pytest.mark.slow  # sieving the 6-block model takes ~20-50 s on 2 busy cores
IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 50, 100, 200, 4, 8, 12]])  # 12 tokens: past the 4-token window
SHORT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm":
         "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm":
         "post_ffw_norm", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return save_tiny_sieved(tmp_path_factory.mktemp("gemma") / "gemma", "q4_0", 32, model_type="gemma3_text")


def _gguf_name(hf_name: str) -> str:
    """model.layers.3.mlp.up_proj(.weight) → blk.3.ffn_up.weight."""
    layer, rest = hf_name.split(".")[2], hf_name.split(".", 3)[3].removesuffix(".weight")
    return f"blk.{layer}.{SHORT[rest]}.weight"


def _with_config(gemma, tmp_path, **changes):
    """A copy of the sieved directory whose saved model config has `changes` (checksums cover the tensors only)."""
    copy = tmp_path / "changed"
    shutil.copytree(gemma, copy)
    config = json.loads((copy / "sieve_config.json").read_text())
    config["model_config"].update(changes)
    (copy / "sieve_config.json").write_text(json.dumps(config))
    return copy


def test_gemma3_alpha_zero_is_exact_with_norms_shifted_by_one(gemma, tmp_path):
    source = read_sieved(gemma, alpha=0)
    report = export(source, "gguf-q4_0", tmp_path / "m.gguf")
    assert report.max_abs_error == 0.0
    reader = GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 6 * 13 + 2  # tied head: llama.cpp reads token_embd
    for name in source.bases:  # Gemma 3 uses llama.cpp's NeoX RoPE: q/k rows as saved, no permutation
        assert types[_gguf_name(name)] == QType.Q4_0
        assert np.array_equal(tensors[_gguf_name(name)], source.weight(name).numpy()), name  # max diff 0
    norm = source.tensors["model.layers.2.self_attn.q_norm.weight"]
    assert np.array_equal(tensors["blk.2.attn_q_norm.weight"], (1.0 + norm).numpy())  # Gemma3RMSNorm's 1 + w
    assert abs(float(tensors["blk.2.attn_q_norm.weight"][0]) - 1.0 - float(norm[0])) < 1e-6 and float(norm[0]) != 0
    assert np.array_equal(tensors["output_norm.weight"], (1.0 + source.tensors["model.norm.weight"]).numpy())
    assert np.array_equal(tensors["token_embd.weight"], source.tensors["model.embed_tokens.weight"].numpy())  # unscaled
    fields = {key: reader.fields[key].contents() for key in reader.fields if key.startswith("gemma3.")}
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert fields | {"gemma3.attention.layer_norm_rms_epsilon": 0.0} == {
        "gemma3.context_length": 128, "gemma3.embedding_length": 64, "gemma3.block_count": 6,
        "gemma3.feed_forward_length": 256, "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.layer_norm_rms_epsilon": 0.0, "gemma3.rope.dimension_count": 256,
        "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256, "gemma3.vocab_size": 300,
        "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 4, "gemma3.rope.freq_base_swa": 1e4}
    assert fields["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)


def test_gemma3_logits_through_transformers_gguf_loader_match_the_alpha_zero_model(gemma, tmp_path):
    export(read_sieved(gemma, alpha=0), "gguf-q4_0", tmp_path / "m.gguf")
    deployed = load_gguf_causal_lm(tmp_path / "m.gguf")
    reference = load_sieved(gemma, with_ortho=False, backend="reference")
    assert type(deployed).__name__ == "Gemma3ForCausalLM"
    assert deployed.config.layer_types == reference.config.layer_types  # 5 sliding, 1 global
    with torch.no_grad():
        deployed_logits, reference_logits = deployed(IDS).logits, reference(IDS).logits
        full = load_sieved(gemma, backend="reference")(IDS).logits  # α = 1: the ortho stream moves the logits
    assert torch.allclose(deployed_logits, reference_logits, rtol=0, atol=1e-5)
    assert (full - reference_logits).abs().max() > 1e-4


def test_gemma3_q8_0_export_is_within_the_q8_0_bound(gemma, tmp_path):
    source = read_sieved(gemma, alpha=0)
    export(source, "gguf-q8_0", tmp_path / "m.gguf")
    tensors = {t.name: quants.dequantize(t.data, t.tensor_type) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    for name in source.bases:  # d = A/127 per block: half a step plus 127 × the fp16 rounding of d
        w = source.weight(name).numpy()
        d = np.abs(w.reshape(w.shape[0], -1, 32)).max(-1) / 127  # (N, K) → (N, K/32)
        assert bool((np.abs(tensors[_gguf_name(name)] - w) <= np.repeat(d * (0.5 + 127 * 2.0**-11), 32, 1)).all())


def test_gemma3_layer_pattern_other_than_llama_cpp_default_is_written_per_layer(gemma, tmp_path):
    layer_types = ["sliding_attention", "full_attention"] * 3
    export(read_sieved(_with_config(gemma, tmp_path, layer_types=layer_types), alpha=0), "gguf-q4_0", tmp_path / "m.gguf")
    field = GGUFReader(tmp_path / "m.gguf").fields["gemma3.attention.sliding_window_pattern"]
    assert field.contents() == [True, False] * 3


@pytest.mark.parametrize(("key", "value", "message"), [
    ("query_pre_attn_scalar", 128, r"model_config\.query_pre_attn_scalar=128: .* needs 256"),
    ("hidden_activation", "gelu", r"model_config\.hidden_activation='gelu'"),
    ("rope_parameters", {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
     r"model_config\.rope_scaling: RoPE scaling 'linear'"),
])
def test_gemma3_configs_llama_cpp_computes_differently_are_refused_by_name(gemma, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        export(read_sieved(_with_config(gemma, tmp_path, **{key: value}), alpha=0), "gguf-q4_0", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
