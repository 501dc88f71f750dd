"""`ortho_train.sieve.fast_decode`: the static-cache decoding loop gives Hugging Face `generate`'s
tokens on a tiny sieved Llama (grouped-query attention, tied head) at α = 0 and α = 1, greedy
and sampling; the compiled step (slow: inductor compiles C++) the same; the GEMV as a registered
op passes torch's operator checks."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ortho_kernels import OrthoStream, QuantisedBase, cpu_gemv
from ortho_kernels.gemv_op import int4_gemv
from ortho_train.models import linear_layers
from ortho_train.ortho_linear import set_alpha
from ortho_train.settings import SettingError
from ortho_train.sieve.core import SievedLayer
from ortho_train.sieve.fast_decode import FastDecodeConfig, FastDecoder, next_token
from ortho_train.sieve.model import build_dual_stream_model

pytestmark = pytest.mark.skipif(isinstance(cpu_gemv.library(), str),
                                reason=f"CPU GEMV unavailable: {cpu_gemv.library()}")
VOCAB, PROMPT, NEW = 300, 7, 20


@pytest.fixture(scope="module")
def sieved():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.25)  # wide logits: varied tokens
    model = LlamaForCausalLM(config).eval()
    layers = {}
    for name, linear in linear_layers(model).items():
        w = linear.weight.detach()
        base = QuantisedBase.from_dense(w, 4, 64)
        layers[name] = SievedLayer(base, OrthoStream.top_fraction(w - base.dequantise(), 0.05), {})
    return build_dual_stream_model(model, layers).eval()


def _prompt():
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def _hf(model, **kw):
    return model.generate(_prompt(), max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None,
                          pad_token_id=0, **kw)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_greedy_tokens_are_generates(sieved, alpha):
    set_alpha(sieved, alpha)
    expected = _hf(sieved, do_sample=False)
    got = FastDecoder(sieved, FastDecodeConfig(max_len=32, compile=False)).generate(_prompt(), NEW)
    assert len(set(expected[0, PROMPT:].tolist())) > 5, "degenerate fixture: the test would prove little"
    assert torch.equal(got, expected), f"α={alpha}: {got[0, PROMPT:].tolist()} != {expected[0, PROMPT:].tolist()}"


def test_sampled_tokens_are_generates(sieved):
    set_alpha(sieved, 1.0)
    torch.manual_seed(5)
    expected = _hf(sieved, do_sample=True, temperature=0.9, top_k=0, top_p=1.0)
    torch.manual_seed(5)
    got = FastDecoder(sieved, FastDecodeConfig(max_len=32, compile=False)).generate(
        _prompt(), NEW, do_sample=True, temperature=0.9)
    assert torch.equal(got, expected), f"{got[0, PROMPT:].tolist()} != {expected[0, PROMPT:].tolist()}"


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_compiled_step_gives_generates_tokens(sieved, alpha):
    set_alpha(sieved, alpha)
    expected = _hf(sieved, do_sample=False)
    decoder = FastDecoder(sieved, FastDecodeConfig(max_len=32))  # fullgraph: a graph break raises
    assert torch.equal(decoder.generate(_prompt(), NEW), expected)


def test_cache_holds_the_models_keys(sieved):
    """After a 4-token prompt + 3 tokens, slots [0, 6) hold the keys the Hugging Face model
    computes for that sequence (the last token's are written by the next step), the rest zeros.
    6 tokens: the model's projections run the same GEMV (M <= 8) as the decoding steps; the
    tolerance covers attention computed in another order (a slot off by one differs by O(1))."""
    set_alpha(sieved, 1.0)
    decoder = FastDecoder(sieved, FastDecodeConfig(max_len=32, compile=False))
    ids = decoder.generate(_prompt()[:, :4], 3)
    with torch.inference_mode():
        out = sieved(input_ids=ids[:, :-1], use_cache=True)
    cache = out["cache"] if "cache" in out else out.past_key_values
    t = ids.shape[1] - 1
    for i, layer in enumerate(cache.layers):
        cached = decoder.step.caches[i]
        torch.testing.assert_close(cached.keys[:, :t], layer.keys[0], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(cached.values[:, :t], layer.values[0], rtol=1e-3, atol=1e-3)
        assert not cached.keys[:, t:].any()


def test_int8_activations_route_to_the_int8_gemv(sieved):
    set_alpha(sieved, 0.0)
    decoder = FastDecoder(sieved, FastDecodeConfig(max_len=32, compile=False, activations="int8"))
    assert decoder.step.blocks[0]["q_proj"].mode == cpu_gemv.gemv_mode("int8", "avx2") == 1
    assert decoder.step.blocks[0]["q_proj"].crow is None  # α = 0: the ortho stream is not held


def test_registered_op_matches_the_gemv_and_passes_opcheck():
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(3)) * 0.05
    base = QuantisedBase.from_dense(w, 4, 64)
    crow, col, values, _ = OrthoStream.top_fraction(w - base.dequantise(), 0.05).to_csr()
    x = torch.randn(2, 192)
    args = (x, base.qweight, base.scales, base.zeros, crow, col, values, 192, 64, 0.5, 0)
    expected = cpu_gemv.gemv(base.qweight, base.scales, base.zeros, 192, 64, x, (crow, col, values), 0.5)
    assert torch.equal(int4_gemv(*args), expected)
    torch.library.opcheck(int4_gemv, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_settings_name_the_setting(sieved):
    with pytest.raises(SettingError, match="activations"):
        FastDecodeConfig(activations="int4")
    with pytest.raises(SettingError, match="int8_dot"):
        FastDecodeConfig(int8_dot="sse")
    with pytest.raises(SettingError, match="max_len"):
        FastDecodeConfig(max_len=1)
    decoder = FastDecoder(sieved, FastDecodeConfig(max_len=10, compile=False))
    with pytest.raises(ValueError, match="fast_decode.max_len=10"):
        decoder.generate(_prompt(), 4)
    with pytest.raises(ValueError, match="batch size 1"):
        decoder.generate(torch.zeros(2, 3, dtype=torch.long), 2)


def test_next_token_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert next_token(logits, False, 1.0, 0) == 1
    torch.manual_seed(0)
    draws = {next_token(logits, True, 1.0, 2) for _ in range(200)}
    assert draws == {1, 3}  # p(1) = e/(e+1) ≈ 0.73, p(3) ≈ 0.27: both come up in 200 draws
