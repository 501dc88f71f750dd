"""OrthoLinear: separate streams, the kill switch, state-dict layouts, HF generate."""
import pytest
import torch

from ortho_kernels import OrthoStream, QuantisedBase
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.ortho_linear import (
    OrthoLinear,
    StreamLayout,
    ortho_layers,
    set_alpha,
    split_state_dict,
    swap_in_ortho_layers,
)
from ortho_train.sieve import SieveConfig, build_dual_stream_model, quantised_layers, sieve_model
from ortho_train.quantisation import QuantConfig


def _layer(n=24, k=80, rho=0.1, bias=True, bits=4, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    base = QuantisedBase.from_dense(w, bits=bits, group_size=group)
    ortho = OrthoStream.top_fraction(w - base.dequantise(), rho)
    b = torch.randn(n, generator=g) if bias else None
    return w, base, ortho, b


def test_alpha_zero_is_bitwise_the_base_even_with_nan_ortho():
    w, base, ortho, b = _layer()
    layer = OrthoLinear.from_streams(base, ortho, b, alpha=0.0)
    base_only = OrthoLinear.from_streams(base, None, b, alpha=1.0)
    layer.ortho_values.fill_(float("nan"))
    x = torch.randn(3, 7, 80)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y, base_only(x))
    layer.alpha = 1.0
    assert torch.isnan(layer(x)).any()  # α=1 really reads the (poisoned) stream


def test_full_ortho_at_alpha_one_reproduces_w_within_fp16():
    w, base, _, b = _layer(bits=2)
    residual = w - base.dequantise()
    ortho = OrthoStream.top_fraction(residual, 1.0)
    layer = OrthoLinear.from_streams(base, ortho, b, alpha=1.0)
    err = (layer.effective_weight() - w).abs()
    bound = residual.abs() * 2.0**-11 + 2.0**-24  # fp16 rounding of the stored residual
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    x = torch.randn(5, 80)
    assert torch.allclose(layer(x), x @ w.T + b, atol=2e-3)


# Per path: the reference is fp32 dequantise-and-matmul (fp32 rounding only); the default
# "auto" on CPU runs this group-32 base through torch's INT4 op (no GEMV for groups < 64),
# which rounds X and the scales to bf16 (2^-8 relative): |y| ~ 3 here, so 3e-2 absolute.
@pytest.mark.parametrize("backend, atol", [("reference", 1e-5), ("auto", 3e-2)])
def test_alpha_scales_the_ortho_contribution(backend, atol):
    w, base, ortho, b = _layer()
    layer = OrthoLinear.from_streams(base, ortho, b, alpha=0.5, backend=backend)
    x = torch.randn(4, 80)
    y0 = x @ base.dequantise().T + b
    expected = y0 + 0.5 * x @ ortho.to_dense().T
    err = float((layer(x) - expected).abs().max())
    assert err <= atol, f"{backend}: max abs error {err:.2e} > {atol:.0e}"


def test_default_backend_is_the_deployed_op():
    w, base, ortho, b = _layer()
    assert OrthoLinear.from_streams(base, ortho, b).backend == "auto"


def test_state_dict_loads_into_an_empty_layout_with_assign():
    w, base, ortho, b = _layer()
    src = OrthoLinear.from_streams(base, ortho, b)
    dst = OrthoLinear(StreamLayout(80, 24, 4, 32, ortho.nnz, True))
    dst.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(2, 80)
    assert torch.equal(dst(x), src(x))
    wrong = OrthoLinear(StreamLayout(80, 24, 4, 32, ortho.nnz + 1, True))
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong.load_state_dict(src.state_dict())


def test_model_swap_set_alpha_split_and_generate():
    torch.manual_seed(0)
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    layers = quantised_layers(model, SieveConfig(QuantConfig("rtn", group_size=32)))
    dual = build_dual_stream_model(model, layers)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # a copy
    assert len(ortho_layers(dual)) == 14 and set_alpha(dual, 0.0) == 14
    assert all(m.alpha == 0.0 for m in ortho_layers(dual).values())
    base, ortho = split_state_dict(dual.state_dict(), ortho_layers(dual))
    assert ortho and all(k.endswith(("ortho_indices", "ortho_values")) for k in ortho)
    assert not any(k.endswith(("ortho_indices", "ortho_values")) for k in base)
    assert "lm_head.weight" in base and "model.embed_tokens.weight" in base
    out = dual.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=6, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 9)
    with pytest.raises(ValueError, match="no OrthoLinear"):
        set_alpha(model, 1.0)
    empty = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    swap_in_ortho_layers(empty, {n: m.layout for n, m in ortho_layers(dual).items()})
    empty.load_state_dict(dual.state_dict(), assign=True)
    ids = torch.tensor([[3, 4, 5, 6]])
    set_alpha(empty, 0.0)
    assert torch.equal(empty(ids).logits, dual(ids).logits)


def test_input_gradients_flow_through_the_frozen_streams():
    w, base, ortho, b = _layer()
    layer = OrthoLinear.from_streams(base, ortho, b)
    x = torch.randn(3, 80, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.effective_weight().sum(0).expand(3, 80), atol=1e-5)


def test_shapes_the_streams_cannot_take_are_clear_errors():
    with pytest.raises(ValueError, match="int32 flat indices"):
        OrthoStream(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.float16),
                    (2**16, 2**16))
    with pytest.raises(ValueError, match="2-D"):
        QuantisedBase.from_dense(torch.randn(4, 4, 4))
    w, base, ortho, b = _layer()
    with pytest.raises(ValueError, match="does not match base"):
        OrthoLinear.from_streams(base, OrthoStream.empty((24, 81)), b)
    model = build_tiny_llama(TinyLlamaConfig(32, 1, 2, 64), 40, 0, 1)
    with pytest.raises(ValueError, match="does not match the layer"):
        swap_in_ortho_layers(model, {"model.layers.0.mlp.up_proj": StreamLayout(31, 64, 4, 32, 0, False)})
