"""GGUF export: read back with gguf.GGUFReader + gguf.quants.dequantize, and with transformers' GGUF loader."""
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, quants

from transformers import AutoTokenizer

from ortho_train.export import export, read_sieved
from ortho_train.export.gguf_vocab import UNUSED_MERGE, bpe_pre_tokenizer, bytes_to_unicode
from ortho_train.gguf_checkpoint import load_gguf_causal_lm, load_gguf_tokenizer
from ortho_train.sieve import load_sieved
from ortho_train.tokenization import build_byte_tokenizer
from tests.ortho_train.export_helpers import HEAD_PERMUTED, save_tiny_sieved, unpermute_rows

IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 50, 100, 200]])
HEADS = {"attn_q": 4, "attn_k": 2}


@pytest.fixture(scope="module")
def sieved(tmp_path_factory):
    """Tied-head sieved Llamas with a BPE tokenizer, on each base grid, by method."""
    root = tmp_path_factory.mktemp("sieved")
    return {method: save_tiny_sieved(root / method, method, group_size)
            for method, group_size in (("q4_0", 32), ("q4_1", 32), ("gptq", 128))}


def _read(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantised to float32 in HF row order (q/k rows un-permuted)."""
    out = {}
    for t in GGUFReader(path).tensors:
        array = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        kind = t.name.split(".")[-2]
        out[t.name] = unpermute_rows(array, HEADS[kind]) if kind in HEAD_PERMUTED else array
    return out


def _gguf_name(hf_name: str) -> str:
    i, rest = hf_name.split(".")[2], hf_name.split(".", 3)[3]
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}[rest]
    return f"blk.{i}.{short}.weight"


@pytest.mark.parametrize(("method", "fmt"), [("q4_0", "gguf-q4_0"), ("q4_1", "gguf-q4_1"), ("q4_0", "gguf-q4_1")])
def test_alpha_zero_on_the_grid_dequantises_to_the_toolkit_weights_exactly(sieved, tmp_path, method, fmt):
    source = read_sieved(sieved[method], alpha=0)
    report = export(source, fmt, tmp_path / "m.gguf")
    assert report.max_abs_error == 0.0 and all(t["exact"] for t in report.tensors.values())
    tensors = _read(tmp_path / "m.gguf")
    assert "output.weight" not in tensors  # tied head: llama.cpp reads token_embd
    assert len(tensors) == 2 * 9 + 2
    for name in source.bases:
        assert np.array_equal(tensors[_gguf_name(name)], source.weight(name).numpy()), name  # max diff 0
    assert np.array_equal(tensors["token_embd.weight"], source.tensors["model.embed_tokens.weight"].numpy())
    qtypes = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert qtypes["blk.0.ffn_down.weight"] == (QType.Q4_0 if fmt == "gguf-q4_0" else QType.Q4_1)


def test_alpha_zero_logits_through_transformers_gguf_loader_match_the_kill_switch_model(sieved, tmp_path):
    export(read_sieved(sieved["q4_1"], alpha=0), "gguf-q4_1", tmp_path / "m.gguf")
    deployed = load_gguf_causal_lm(tmp_path / "m.gguf")
    reference = load_sieved(sieved["q4_1"], with_ortho=False, backend="reference")
    with torch.no_grad():
        assert torch.allclose(deployed(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-5)
    tokenizer = load_gguf_tokenizer(tmp_path / "m.gguf")
    original = AutoTokenizer.from_pretrained(sieved["q4_1"])
    text = "The secret code of the lazy fox"
    assert tokenizer(text).input_ids == original(text).input_ids


def test_qwen2_with_biases_round_trips_through_transformers_gguf_loader(tmp_path):
    path = save_tiny_sieved(tmp_path / "qwen2", "q4_1", 32, model_type="qwen2")
    source = read_sieved(path, alpha=0)
    report = export(source, "gguf-q4_1", tmp_path / "m.gguf")
    assert report.max_abs_error == 0.0 and "blk.0.attn_q.bias" in report.tensors
    tensors = {t.name: quants.dequantize(t.data, t.tensor_type) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    name = "model.layers.1.self_attn.q_proj"
    assert np.array_equal(tensors["blk.1.attn_q.weight"], source.weight(name).numpy())  # Qwen2: not permuted
    assert np.array_equal(tensors["blk.1.attn_q.bias"], source.biases[name].numpy())
    deployed = load_gguf_causal_lm(tmp_path / "m.gguf")
    reference = load_sieved(path, with_ortho=False, backend="reference")
    assert type(deployed).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert torch.allclose(deployed(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-5)


def test_gptq_g128_base_to_q4_is_lossy_within_the_documented_bound(sieved, tmp_path):
    source = read_sieved(sieved["gptq"], alpha=0)
    for fmt, qtype in (("gguf-q4_0", QType.Q4_0), ("gguf-q4_1", QType.Q4_1)):
        report = export(source, fmt, tmp_path / f"{fmt}.gguf")
        tensors = _read(tmp_path / f"{fmt}.gguf")
        for name in source.bases:
            w = source.weight(name).numpy()
            err = np.abs(tensors[_gguf_name(name)] - w)
            blocks = w.reshape(w.shape[0], -1, 32)  # (N, K) → (N, K/32, 32)
            if qtype == QType.Q4_0:  # d = A/8; one step where the side opposite the largest |w| clips
                bound = np.abs(blocks).max(-1) / 8 * (1 + 2.0**-8)
            else:  # d = (max − min)/15, m = min: half a step, plus the fp16 rounding of d and m
                d, m = np.ptp(blocks, -1) / 15, blocks.min(-1)
                bound = d / 2 + 2.0**-11 * (15 * d + np.abs(m))
            assert bool((err <= np.repeat(bound, 32, axis=1)).all()), (fmt, name)
            assert report.tensors[_gguf_name(name)]["max_abs_error"] == pytest.approx(float(err.max()), abs=1e-7)
        assert 0 < report.max_abs_error < 0.05 and not any(
            t["exact"] for n, t in report.tensors.items() if n.startswith("blk") and n.endswith("proj.weight"))


@pytest.mark.parametrize(("fmt", "qtype"), [("gguf-q8_0", QType.Q8_0), ("gguf-f16", QType.F16)])
def test_alpha_one_merges_base_and_ortho(sieved, tmp_path, fmt, qtype):
    source = read_sieved(sieved["gptq"], alpha=1)
    report = export(source, fmt, tmp_path / "m.gguf")
    reader = GGUFReader(tmp_path / "m.gguf")
    assert float(reader.fields["ortho_train.alpha"].parts[-1][0]) == 1.0
    tensors = _read(tmp_path / "m.gguf")
    model = load_sieved(sieved["gptq"], backend="reference")
    for name in source.bases:
        merged = model.get_submodule(name).effective_weight(1.0).numpy()
        assert np.array_equal(source.weight(name).numpy(), merged)
        if qtype == QType.Q8_0:  # d = A/127 per block: half a step plus 127 × the fp16 rounding of d
            d = np.abs(merged.reshape(merged.shape[0], -1, 32)).max(-1) / 127  # (N, K/32)
            tol = np.repeat(d * (0.5 + 127 * 2.0**-11), 32, axis=1)
        else:
            tol = np.abs(merged) * 2.0**-11
        assert bool((np.abs(tensors[_gguf_name(name)] - merged) <= tol).all())
    assert report.max_abs_error > 0


def test_alpha_zero_never_reads_the_ortho_stream(sieved, tmp_path):
    public = tmp_path / sieved["q4_0"].name  # general.name is the directory's name
    shutil.copytree(sieved["q4_0"], public)
    (public / "ortho.safetensors").unlink()  # what a public release holds
    export(read_sieved(public, alpha=0), "gguf-q4_0", tmp_path / "a.gguf")
    export(read_sieved(sieved["q4_0"], alpha=0), "gguf-q4_0", tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    names = [t.name for t in GGUFReader(tmp_path / "a.gguf").tensors]
    assert names and not any("ortho" in n for n in names)


def test_rows_without_whole_blocks_fall_back_to_f32_exactly(tmp_path):
    path = save_tiny_sieved(tmp_path / "ragged", "gptq", 128, intermediate=136)  # ffn_down rows of 136
    source = read_sieved(path, alpha=0)
    report = export(source, "gguf-q4_0", tmp_path / "m.gguf")
    assert report.tensors["blk.0.ffn_down.weight"] == {"type": "F32", "exact": True, "max_abs_error": 0.0}
    tensors = _read(tmp_path / "m.gguf")
    assert np.array_equal(tensors["blk.1.ffn_down.weight"], source.weight("model.layers.1.mlp.down_proj").numpy())
    assert report.tensors["blk.0.ffn_up.weight"]["type"] == "Q4_0"


def _strings(reader: GGUFReader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def test_byte_tokenizer_is_written_as_byte_level_bpe(tmp_path):
    path = save_tiny_sieved(tmp_path / "byte", "q4_0", 32, tokenizer=build_byte_tokenizer(), tied=False)
    report = export(read_sieved(path, alpha=0), "gguf-q4_0", tmp_path / "m.gguf")
    assert report.tensors["output.weight"]["exact"] and report.tensors["output.weight"]["type"] == "Q4_0"
    reader = GGUFReader(tmp_path / "m.gguf")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    table = bytes_to_unicode()
    ids = build_byte_tokenizer()("a ü\n").input_ids[:-1]  # ByT5 appends </s>
    assert [tokens[i] for i in ids] == [table[b] for b in "a ü\n".encode()]  # one token per byte, same ids
    assert tokens[:3] == ["<pad>", "</s>", "<unk>"] and len(tokens) == 259
    assert _strings(reader, "tokenizer.ggml.merges") == [UNUSED_MERGE]
    assert _strings(reader, "tokenizer.ggml.model") == ["gpt2"]


def test_gpt2_regex_tokenizer_gets_llama_cpp_gpt2_pre_tokenizer(sieved, tmp_path):
    export(read_sieved(sieved["q4_0"], alpha=0), "gguf-q4_0", tmp_path / "m.gguf")
    assert _strings(GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.pre") == ["gpt-2"]  # ByteLevel, use_regex
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert bpe_pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    for other in ({"pre_tokenizer": byte_level | {"use_regex": False}},  # Llama 3 / Qwen2: a Split regex first
                  {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split"}, byte_level]}},
                  {"pre_tokenizer": byte_level | {"add_prefix_space": True}},
                  {"pre_tokenizer": byte_level, "normalizer": {"type": "NFC"}}):
        assert bpe_pre_tokenizer(other) == "default", other


def _spm_vocab_gguf(path, n_tokens: int) -> list[str]:
    """A GGUF holding only a SentencePiece-style vocabulary (llama.cpp's "llama" model) of n_tokens."""
    import gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"▁piece{i}" for i in range(n_tokens - 4)]
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 4 + [-float(i) for i in range(n_tokens - 4)])
    writer.add_token_types([3, 3, 3, 2] + [1] * (n_tokens - 4))
    writer.add_bos_token_id(2)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_vocabulary_copied_from_another_gguf_file(sieved, tmp_path):
    source = read_sieved(sieved["q4_0"], alpha=0)
    vocab_size = source.model_config["vocab_size"]
    tokens = _spm_vocab_gguf(tmp_path / "vocab.gguf", vocab_size)
    export(source, "gguf-q4_0", tmp_path / "m.gguf", vocab_from=tmp_path / "vocab.gguf")
    reader = GGUFReader(tmp_path / "m.gguf")
    assert _strings(reader, "tokenizer.ggml.tokens") == tokens and _strings(reader, "tokenizer.ggml.model") == ["llama"]
    assert reader.fields["tokenizer.ggml.scores"].contents()[4:7] == [0.0, -1.0, -2.0]
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 2
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert "tokenizer.ggml.merges" not in reader.fields  # nothing of the saved BPE tokenizer is written
    _spm_vocab_gguf(tmp_path / "small.gguf", vocab_size - 1)
    with pytest.raises(ValueError, match=f"small.gguf: {vocab_size - 1} tokens, but the model's vocab_size is {vocab_size}"):
        export(source, "gguf-q4_0", tmp_path / "n.gguf", vocab_from=tmp_path / "small.gguf")


def test_refusals_name_the_problem(sieved, tmp_path):
    with pytest.raises(ValueError, match="gguf-q4_0 exports α ∈ \\['0'\\]"):
        export(read_sieved(sieved["q4_0"], alpha=1), "gguf-q4_0", tmp_path / "m.gguf")
    other = tmp_path / "phi3"
    shutil.copytree(sieved["q4_0"], other)
    config = (other / "sieve_config.json").read_text().replace('"model_type": "llama"', '"model_type": "phi3"')
    (other / "sieve_config.json").write_text(config)
    with pytest.raises(ValueError, match="holds a 'phi3' model"):
        export(read_sieved(other, alpha=0), "gguf-q4_0", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
