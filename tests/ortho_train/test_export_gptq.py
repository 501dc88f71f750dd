"""GPTQ checkpoint export, unpacked by a reference reader written from the format's spec."""
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from ortho_kernels import QuantisedBase, pack_bits
from ortho_train.export import export, read_sieved
from ortho_train.export.gptq_checkpoint import gptq_tensors
from tests.ortho_train.export_helpers import save_tiny_sieved

LOADERS = ("optimum", "gptqmodel", "auto_gptq")


@pytest.fixture(scope="module")
def sieved(tmp_path_factory):
    return save_tiny_sieved(tmp_path_factory.mktemp("sieved") / "gptq", "gptq", 128)


def unpack_words(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words → 4-bit values, eight per word along `dim` (value j in bits [4j, 4j+4))."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # reinterpret as unsigned 32 bits
    parts = [(w >> (4 * j)) & 0xF for j in range(8)]
    return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)  # (…, R, 8, …) → (…, 8R, …)


def reference_dequantise(state: dict, name: str, checkpoint_format: str) -> torch.Tensor:
    """w[n, k] = (q[k, n] − z[g_idx[k], n]) · s[g_idx[k], n], zeros +1 in the v1 'gptq' format; (N, K)."""
    q = unpack_words(state[f"{name}.qweight"], 0)  # (K/8, N) → (K, N)
    z = unpack_words(state[f"{name}.qzeros"], 1)  # (G, N/8) → (G, N)
    if checkpoint_format == "gptq":
        z = z + 1
    g_idx = state[f"{name}.g_idx"].long()
    s = state[f"{name}.scales"].float()  # (G, N)
    return ((q - z[g_idx]).float() * s[g_idx]).T  # (K, N) → (N, K)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_unpacked_checkpoint_is_the_alpha_zero_weights_exactly(sieved, tmp_path, checkpoint_format):
    source = read_sieved(sieved, alpha=0)
    export(source, "gptq", tmp_path / "out", checkpoint_format=checkpoint_format)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert not any("ortho" in k for k in state) and "lm_head.weight" not in state  # tied head
    for name in source.bases:
        assert state[f"{name}.qweight"].dtype == torch.int32 and state[f"{name}.scales"].dtype == torch.float16
        assert torch.equal(reference_dequantise(state, name, checkpoint_format), source.weight(name)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["checkpoint_format"] == checkpoint_format
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"]) == ("gptq", 4, 128, False, False)
    assert json.loads((tmp_path / "out" / "quantize_config.json").read_text()) == q
    assert config["architectures"] == ["LlamaForCausalLM"] and (tmp_path / "out" / "tokenizer.json").is_file()
    assert not (tmp_path / "out" / "ortho.safetensors").exists()


def test_a_ragged_last_group_is_exact_too(tmp_path):
    path = save_tiny_sieved(tmp_path / "ragged", "gptq", 128, intermediate=136)  # down_proj: K = 128 + 8
    source = read_sieved(path, alpha=0)
    export(source, "gptq", tmp_path / "out", checkpoint_format="gptq_v2")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.0.mlp.down_proj"
    assert tuple(state[f"{name}.scales"].shape) == (2, 128) and tuple(state[f"{name}.qweight"].shape) == (17, 128)
    for name in source.bases:
        assert torch.equal(reference_dequantise(state, name, "gptq_v2"), source.weight(name)), name


def test_zero_point_zero_needs_the_v2_format():
    codes = torch.randint(0, 16, (8, 16), dtype=torch.uint8)
    zeros = torch.tensor([[0.0], [1.0], [8.0], [15.0], [3.0], [4.0], [5.0], [6.0]], dtype=torch.float16)
    base = QuantisedBase(pack_bits(codes, 4), torch.full((8, 1), 0.5, dtype=torch.float16), zeros, (8, 16), 16, 4)
    with pytest.raises(ValueError, match="zero-point 0.*--checkpoint-format gptq_v2"):
        gptq_tensors(base, "gptq")
    packed = gptq_tensors(base, "gptq_v2")
    assert torch.equal(unpack_words(packed["qzeros"], 1)[0], zeros[:, 0].long())
    assert torch.equal(unpack_words(packed["qweight"], 0).T, codes.long())  # (K, N) → (N, K)


def test_alpha_one_is_refused(sieved, tmp_path):
    with pytest.raises(ValueError, match="gptq exports α ∈ \\['0'\\]"):
        export(read_sieved(sieved, alpha=1), "gptq", tmp_path / "out")


@pytest.mark.skipif(not any(importlib.util.find_spec(m) for m in LOADERS),
                    reason="no GPTQ loader (optimum / gptqmodel / auto_gptq) is installed: the logits check "
                           "through transformers' GPTQ integration needs one (not in the locks)")
def test_transformers_gptq_loader_reproduces_alpha_zero_logits(sieved, tmp_path):  # pragma: no cover
    from transformers import AutoModelForCausalLM

    from ortho_train.sieve import load_sieved
    export(read_sieved(sieved, alpha=0), "gptq", tmp_path / "out")
    deployed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    reference = load_sieved(sieved, with_ortho=False, backend="reference")
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        got, want = deployed(ids).logits.float(), reference(ids).logits
    assert torch.allclose(got, want, atol=5e-2 * float(want.abs().max()))  # fp16 kernels
