"""Sieved-model artifacts: base and ortho streams in *separate* safetensors files.

    <dir>/sieve_config.json     format, Hugging Face model config, per-layer StreamLayout,
                                file names, SHA-256 of both files, a pair id, free metadata
    <dir>/base.safetensors      every tensor of the model except the ortho buffers:
                                packed codes, scales, zeros, biases, embeddings, norms, head
    <dir>/ortho.safetensors     only `<layer>.ortho_indices` / `<layer>.ortho_values`

The base file alone is a complete model (α = 0) and holds no ortho tensor; base + ortho give
every α. Both files carry the pair id in their safetensors metadata, so an ortho file from
another sieve is refused with a clear error, as is a file whose checksum or layout does not
match the config. The directory is written atomically (`atomic_directory`).
"""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ortho_train.artifacts import atomic_directory
from ortho_train.ortho_linear import (
    ORTHO_KEYS,
    StreamLayout,
    ortho_layers,
    split_state_dict,
    swap_in_ortho_layers,
)

FORMAT = "ortho-train-sieve/1"
CONFIG_NAME = "sieve_config.json"
BASE_NAME = "base.safetensors"
ORTHO_NAME = "ortho.safetensors"


class SieveArtifactError(ValueError):
    """A sieved-model directory is missing, corrupt or mismatched."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_sieved(model: nn.Module, directory: str | Path, metadata: dict | None = None,
                tokenizer=None) -> Path:
    """Write a model with `OrthoLinear` layers as base + ortho files and a JSON config."""
    layers = ortho_layers(model)
    if not layers:
        raise ValueError("the model has no OrthoLinear layers: sieve it before saving")
    if not hasattr(model, "config"):
        raise ValueError("save_sieved needs a Hugging Face model (with a .config)")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    base, ortho = split_state_dict(state, layers)
    pair = uuid.uuid4().hex
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(base, tmp / BASE_NAME, metadata={"format": FORMAT, "stream": "base", "pair_id": pair})
        save_file(ortho, tmp / ORTHO_NAME, metadata={"format": FORMAT, "stream": "ortho", "pair_id": pair})
        config = {
            "format": FORMAT,
            "pair_id": pair,
            "model_config": model.config.to_dict(),
            "layers": {name: layer.layout.to_dict() for name, layer in layers.items()},
            "alpha": {name: layer.alpha for name, layer in layers.items()},
            "files": {"base": {"name": BASE_NAME, "sha256": _sha256(tmp / BASE_NAME)},
                      "ortho": {"name": ORTHO_NAME, "sha256": _sha256(tmp / ORTHO_NAME)}},
            "metadata": metadata or {},
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise SieveArtifactError(f"{path} not found: not a sieved-model directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SieveArtifactError(f"{path} is not valid JSON: {err}") from err
    if config.get("format") != FORMAT:
        raise SieveArtifactError(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def _read_stream(directory: Path, config: dict, stream: str, verify: bool) -> dict[str, torch.Tensor]:
    entry = config["files"][stream]
    path = directory / entry["name"]
    if not path.is_file():
        raise SieveArtifactError(f"the {stream} file {path} is missing")
    if verify and _sha256(path) != entry["sha256"]:
        raise SieveArtifactError(f"{path} does not match the checksum in {CONFIG_NAME} "
                                 f"(corrupt, or from another sieve)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise SieveArtifactError(f"cannot read {path} as safetensors: {err}") from err
    if meta.get("stream") != stream or meta.get("pair_id") != config["pair_id"]:
        raise SieveArtifactError(f"{path} is not the {stream} stream of this sieve (pair id "
                                 f"{meta.get('pair_id')!r}, config {config['pair_id']!r})")
    return tensors


def load_sieved(directory: str | Path, with_ortho: bool = True, alpha: float | None = None,
                backend: str = "auto", verify: bool = True) -> nn.Module:
    """Rebuild a sieved model. `with_ortho=False` reads the base file only: the α = 0 model.

    alpha: None keeps the saved per-layer α (0 everywhere without the ortho stream).
    backend: "auto" (default) runs the deployed op — the CPU fast path on CPU, the Triton
    kernel on CUDA; "reference" the dense dequantise-and-matmul (tests).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = _read_config(directory)
    hf = dict(config["model_config"])
    model_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    # Built on CPU, not on the meta device: non-persistent buffers (RoPE tables) are computed
    # by each architecture's own __init__, which keeps this loader architecture-agnostic.
    model = AutoModelForCausalLM.from_config(model_config)
    layouts = {name: StreamLayout(**layout) for name, layout in config["layers"].items()}
    if not with_ortho:
        layouts = {name: StreamLayout(**(layout.to_dict() | {"nnz": 0})) for name, layout in layouts.items()}
    swap_in_ortho_layers(model, layouts, backend=backend)

    state = _read_stream(directory, config, "base", verify)
    stray = [k for k in state if k.rsplit(".", 1)[-1] in ORTHO_KEYS]
    if stray:
        raise SieveArtifactError(f"the base file holds ortho tensors ({stray[:3]}…)")
    if with_ortho:
        ortho = _read_stream(directory, config, "ortho", verify)
        foreign = [k for k in ortho if k.rsplit(".", 1)[-1] not in ORTHO_KEYS]
        if foreign:
            raise SieveArtifactError(f"the ortho file holds non-ortho tensors ({foreign[:3]}…)")
        state |= ortho
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(state)
                     if with_ortho or k.rsplit(".", 1)[-1] not in ORTHO_KEYS)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise SieveArtifactError(f"the files do not match the config's model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    for key, tensor in model.state_dict().items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise SieveArtifactError(f"{key}: file shape {tuple(state[key].shape)} does not match "
                                     f"the layout {tuple(tensor.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    for name, layer in ortho_layers(model).items():
        if with_ortho:
            layer.ortho(check=True)  # sorted, unique, in range: checked once at load
        layer.alpha = float(alpha if alpha is not None else
                            (config["alpha"].get(name, 1.0) if with_ortho else 0.0))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()

