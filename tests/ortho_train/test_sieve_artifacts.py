"""Sieve artifacts: separate base/ortho safetensors, round trips, and clear errors on bad files."""
import json

import pytest
import torch
from safetensors import safe_open

from ortho_train.curvature import collect_hessians
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.ortho_linear import ortho_layers, set_alpha
from ortho_train.quantisation import QuantConfig
from ortho_train.sieve import (
    SieveArtifactError,
    SieveConfig,
    build_dual_stream_model,
    load_sieved,
    save_sieved,
    sieve_model,
)


def _sieved(seed=0, rho=0.05):
    torch.manual_seed(seed)
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1).eval()
    batches = [{"input_ids": torch.randint(2, 40, (4, 16))} for _ in range(2)]
    layers = sieve_model(model, "posthoc", SieveConfig(QuantConfig("gptq", 4, 32), rho=rho),
                         collect_hessians(model, batches))
    return build_dual_stream_model(model, layers).eval()


IDS = torch.tensor([[3, 5, 7, 9, 11, 13]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _sieved()
    path = save_sieved(model, tmp_path_factory.mktemp("sv") / "sieved", metadata={"note": "test"})
    return model, path


@torch.no_grad()
def test_round_trip_reproduces_alpha_one_and_alpha_zero(saved):
    model, path = saved
    loaded = load_sieved(path)
    set_alpha(model, 1.0)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    base_only = load_sieved(path, with_ortho=False)
    assert all(m.nnz == 0 and m.alpha == 0.0 for m in ortho_layers(base_only).values())
    set_alpha(model, 0.0)
    set_alpha(loaded, 0.0)
    assert torch.equal(base_only(IDS).logits, model(IDS).logits)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    set_alpha(model, 1.0)


def test_base_file_holds_no_ortho_tensor_and_ortho_file_nothing_else(saved):
    _, path = saved
    with safe_open(str(path / "base.safetensors"), "pt") as f:
        base_keys = list(f.keys())
    with safe_open(str(path / "ortho.safetensors"), "pt") as f:
        ortho_keys = list(f.keys())
    assert base_keys and not any("ortho" in k for k in base_keys)
    assert any(k.endswith(".qweight") for k in base_keys) and "lm_head.weight" in base_keys
    assert ortho_keys and all(k.endswith((".ortho_indices", ".ortho_values")) for k in ortho_keys)
    config = json.loads((path / "sieve_config.json").read_text())
    assert config["metadata"] == {"note": "test"} and len(config["layers"]) == 14


def test_mismatched_ortho_file_is_refused(saved, tmp_path):
    _, path = saved
    other = save_sieved(_sieved(seed=1), tmp_path / "other")
    (path.parent / "mixed").mkdir()
    mixed = path.parent / "mixed"
    for name in ("sieve_config.json", "base.safetensors"):
        (mixed / name).write_bytes((path / name).read_bytes())
    (mixed / "ortho.safetensors").write_bytes((other / "ortho.safetensors").read_bytes())
    with pytest.raises(SieveArtifactError, match="checksum"):
        load_sieved(mixed)
    with pytest.raises(SieveArtifactError, match="pair id"):
        load_sieved(mixed, verify=False)
    assert isinstance(load_sieved(mixed, with_ortho=False), torch.nn.Module)  # base alone is fine


def test_corrupt_or_missing_files_are_clear_errors(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("sieve_config.json", "base.safetensors", "ortho.safetensors"):
        (bad / name).write_bytes((path / name).read_bytes())
    data = (bad / "base.safetensors").read_bytes()
    (bad / "base.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SieveArtifactError, match="checksum"):
        load_sieved(bad)
    with pytest.raises(SieveArtifactError, match="cannot read"):
        load_sieved(bad, verify=False)
    (bad / "ortho.safetensors").unlink()
    with pytest.raises(SieveArtifactError, match="missing"):
        load_sieved(bad)
    with pytest.raises(SieveArtifactError, match="not a sieved-model directory"):
        load_sieved(tmp_path / "nowhere")


def test_a_failed_save_keeps_the_previous_artifact(saved):
    model, path = saved
    before = (path / "base.safetensors").read_bytes()
    plain = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    with pytest.raises(ValueError, match="no OrthoLinear"):
        save_sieved(plain, path)

    class Boom(RuntimeError):
        pass

    broken = _sieved(seed=2)
    broken.config.to_dict = lambda: (_ for _ in ()).throw(Boom("config failed"))
    with pytest.raises(Boom):
        save_sieved(broken, path)
    assert (path / "base.safetensors").read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".sieved")]
