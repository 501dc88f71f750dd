"""Fingerprints tell identical models apart from different ones, and ignore what α = 0 never reads."""
import torch

from ortho_kernels import OrthoStream
from ortho_train.model_fingerprint import model_fingerprint
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.ortho_linear import ortho_layers, set_alpha
from ortho_train.quantisation import QuantConfig
from ortho_train.sieve import SieveConfig, build_dual_stream_model
from ortho_train.sieve.core import SievedLayer
from ortho_train.sieve.model import quantised_layers


def _dual(model, fill: float):
    layers = quantised_layers(model, SieveConfig(QuantConfig("rtn", 4, 32)))
    with_ortho = {}
    for name, layer in layers.items():
        n, k = layer.base.shape
        dense = torch.zeros(n, k)
        dense[0, :3] = fill  # three entries in row 0
        with_ortho[name] = SievedLayer(layer.base, OrthoStream.from_dense(dense), {})
    return build_dual_stream_model(model, with_ortho)


def test_fingerprint_ignores_unread_ortho_values_only():
    model = build_tiny_llama(TinyLlamaConfig(32, 1, 2, 64), 40, 0, 1)
    a, b = _dual(model, 0.5), _dual(model, -0.25)  # same bases, different ortho values
    set_alpha(a, 0.0), set_alpha(b, 0.0)
    assert model_fingerprint(a) == model_fingerprint(b)  # α = 0 never reads the ortho stream
    set_alpha(a, 1.0), set_alpha(b, 1.0)
    assert model_fingerprint(a) != model_fingerprint(b)
    set_alpha(b, 0.5)
    assert model_fingerprint(b) != model_fingerprint(_dual(model, -0.25))  # α itself counts
    assert len(ortho_layers(a)) == 7


def test_empty_stream_at_any_alpha_is_the_alpha_zero_model():
    """An empty ortho stream computes the base alone at every α, like α = 0 with a full one:
    the quantised public model and the delta/isolated α = 0 rows share one fingerprint."""
    model = build_tiny_llama(TinyLlamaConfig(32, 1, 2, 64), 40, 0, 1)
    layers = quantised_layers(model, SieveConfig(QuantConfig("rtn", 4, 32)))
    empty = build_dual_stream_model(model, layers)  # empty ortho streams
    full = _dual(model, 0.5)
    set_alpha(empty, 1.0), set_alpha(full, 0.0)
    assert model_fingerprint(empty) == model_fingerprint(full)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(empty(ids).logits, full(ids).logits)  # one computation path: base only
    set_alpha(full, 1.0)
    assert model_fingerprint(empty) != model_fingerprint(full)


def test_fingerprint_sees_every_weight_and_buffer():
    model = build_tiny_llama(TinyLlamaConfig(32, 1, 2, 64), 40, 0, 1)
    before = model_fingerprint(model)
    assert model_fingerprint(build_tiny_llama(TinyLlamaConfig(32, 1, 2, 64), 40, 0, 1)) == before
    with torch.no_grad():
        model.model.norm.weight[3] += 1e-7
    assert model_fingerprint(model) != before
