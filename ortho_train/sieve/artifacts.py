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

A head tied to the input embedding is written once (the embedding's key; an older directory
holding both keys still loads, the head's copy unread) and tied again at load.
`embedding="int8"` (at save, or at load for a float file) stores or runs the embedding and a
dense head as per-row absmax INT8 (`ortho_train.int8_embedding`).

Loading takes no memory beyond the tensors themselves: the model skeleton is built with its
parameters on the meta device (`ortho_train.sieve.empty_model`), every check runs on the files'
headers (keys, shapes, pair id) before a tensor is read, and the tensors are the safetensors
file's own memory-mapped pages, assigned into the model (`load_state_dict(assign=True)`).
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
from ortho_train.int8_embedding import (
    EmbeddingFormat,
    EmbeddingModules,
    embedding_modules,
    int8_tables,
    retie_int8_head,
    to_int8_embeddings,
)
from ortho_train.ortho_linear import (
    ORTHO_KEYS,
    StreamLayout,
    ortho_layers,
    split_state_dict,
    swap_in_ortho_layers,
)
from ortho_train.settings import check_choices
from ortho_train.sieve.empty_model import empty_causal_lm, materialise_empty

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
                tokenizer=None, embedding: EmbeddingFormat = "float") -> Path:
    """Write a model with `OrthoLinear` layers as base + ortho files and a JSON config.

    embedding: "float" keeps the embedding and a dense head as they are; "int8" stores them as
    per-row absmax INT8 (`ortho_train.int8_embedding`; |w − ŵ| ≤ max|w_row| / 254).
    A tied head is stored once, as the embedding."""
    check_choices("save_sieved", embedding=(embedding, EmbeddingFormat))
    layers = ortho_layers(model)
    if not layers:
        raise ValueError("the model has no OrthoLinear layers: sieve it before saving")
    if not hasattr(model, "config"):
        raise ValueError("save_sieved needs a Hugging Face model (with a .config)")
    where = embedding_modules(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if not (where.tied and k == f"{where.output}.weight")}  # the embedding's key holds it
    if embedding == "int8":
        state |= int8_tables(state, where)
        for key in where.float_keys():
            state.pop(key, None)
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
            "embedding": {"format": embedding,
                          "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")},
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


def _open_stream(directory: Path, config: dict, stream: str, verify: bool) -> tuple[Path, dict]:
    """The checked path of a stream's file and its tensors' shapes by key, from the header only:
    present, matching the config's checksum (when `verify`), readable, of this sieve's pair."""
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
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise SieveArtifactError(f"cannot read {path} as safetensors: {err}") from err
    if meta.get("stream") != stream or meta.get("pair_id") != config["pair_id"]:
        raise SieveArtifactError(f"{path} is not the {stream} stream of this sieve (pair id "
                                 f"{meta.get('pair_id')!r}, config {config['pair_id']!r})")
    return path, shapes


def _tensors(path: Path, keys) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, as views of its memory map (no copy is made;
    pages become resident as they are read, and stay mapped while any of them lives)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise SieveArtifactError(f"cannot read {path} as safetensors: {err}") from err


def _read_stream(directory: Path, config: dict, stream: str, verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a stream's file, checked as `_open_stream` checks it."""
    path, shapes = _open_stream(directory, config, stream, verify)
    return _tensors(path, shapes)


def _check_keys(model: nn.Module, shapes: dict[str, tuple], with_ortho: bool, optional: set[str]) -> None:
    """The files' keys and shapes against the model the config describes (nothing read yet)."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    missing = sorted(k for k in set(expected) - set(shapes) - optional
                     if with_ortho or k.rsplit(".", 1)[-1] not in ORTHO_KEYS)
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise SieveArtifactError(f"the files do not match the config's model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise SieveArtifactError(f"{key}: file shape {shapes[key]} does not match "
                                     f"the layout {shape}")


def _int8_from_float(path: Path, where: EmbeddingModules) -> tuple[dict, torch.dtype]:
    """INT8 tables of the float embedding (and head) in `path`, and their float dtype. Read
    through a map of their own, unmapped on return: their float pages do not stay resident."""
    keys = [k for k in where.float_keys() if not (where.tied and k == f"{where.output}.weight")]
    weights = _tensors(path, keys)
    dtype = weights[f"{where.input}.weight"].dtype
    return int8_tables(weights, where), dtype


def _optional_keys(where: EmbeddingModules, int8: bool) -> set[str]:
    """A tied head's keys: absent from a new file (stored as the embedding), unread if present."""
    if not where.tied:
        return set()
    return {f"{where.output}.weight_int8", f"{where.output}.weight_scale"} if int8 else {f"{where.output}.weight"}


def load_sieved(directory: str | Path, with_ortho: bool = True, alpha: float | None = None,
                backend: str = "auto", verify: bool = True, weight_cache: bool = False,
                embedding: EmbeddingFormat | None = None) -> nn.Module:
    """Rebuild a sieved model. `with_ortho=False` reads the base file only: the α = 0 model.

    alpha: None keeps the saved per-layer α (0 everywhere without the ortho stream).
    backend: "auto" (default) runs the deployed op — the CPU fast path on CPU, the Triton
    kernel on CUDA; "reference" the dense dequantise-and-matmul (tests).
    weight_cache: keep each layer's dense fp32 weight for prefill (faster, 4 bytes per weight,
    8 at α ≠ 0; `OrthoLinear.weight_cache`); by default it is rebuilt per call in blocks.
    embedding: None as saved; "int8" quantises a float embedding and dense head at load
    (`ortho_train.int8_embedding`); "float" refuses a directory saved with "int8".
    """
    if embedding is not None:
        check_choices("load_sieved", embedding=(embedding, EmbeddingFormat))
    directory = Path(directory)
    config = _read_config(directory)
    base_path, shapes = _open_stream(directory, config, "base", verify)
    stray = [k for k in shapes if k.rsplit(".", 1)[-1] in ORTHO_KEYS]
    if stray:
        raise SieveArtifactError(f"the base file holds ortho tensors ({stray[:3]}…)")
    ortho_path, ortho_shapes = (_open_stream(directory, config, "ortho", verify) if with_ortho
                                else (None, {}))
    foreign = [k for k in ortho_shapes if k.rsplit(".", 1)[-1] not in ORTHO_KEYS]
    if foreign:
        raise SieveArtifactError(f"the ortho file holds non-ortho tensors ({foreign[:3]}…)")
    saved = config.get("embedding", {}).get("format", "float")
    if saved == "int8" and embedding == "float":
        raise SieveArtifactError(f"{directory} was saved with embedding='int8': its float tables are "
                                 f"gone; load it with embedding=None or 'int8'")
    model = _skeleton(config, with_ortho, backend)
    where = embedding_modules(model)
    if saved == "int8":
        to_int8_embeddings(model, where, getattr(torch, config["embedding"]["dtype"]))
    optional = _optional_keys(where, saved == "int8")
    _check_keys(model, shapes | ortho_shapes, with_ortho, optional)
    convert = saved == "float" and embedding == "int8"
    skip = optional | (set(where.float_keys()) if convert else set())
    state = _tensors(base_path, [k for k in shapes if k not in skip])
    if with_ortho:
        state |= _tensors(ortho_path, ortho_shapes)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    _finish_tables(model, where, saved, convert, base_path)
    left = materialise_empty(model)
    if left:
        raise SieveArtifactError(f"the files hold no tensor for {left[:5]}")
    for name, layer in ortho_layers(model).items():
        if with_ortho:
            layer.ortho(check=True)  # sorted, unique, in range: checked once at load
        layer.alpha = float(alpha if alpha is not None else
                            (config["alpha"].get(name, 1.0) if with_ortho else 0.0))
        layer.weight_cache = bool(weight_cache)
    return model.eval()


def _skeleton(config: dict, with_ortho: bool, backend: str) -> nn.Module:
    """The config's model with parameters on meta and empty `OrthoLinear` layers swapped in."""
    model = empty_causal_lm(config["model_config"])
    layouts = {name: StreamLayout(**layout) for name, layout in config["layers"].items()}
    if not with_ortho:
        layouts = {name: StreamLayout(**(layout.to_dict() | {"nnz": 0})) for name, layout in layouts.items()}
    return swap_in_ortho_layers(model, layouts, backend=backend)


def _finish_tables(model: nn.Module, where: EmbeddingModules, saved: str, convert: bool,
                   base_path: Path) -> None:
    """Tie the head again, or build the INT8 tables asked for at load from the float file."""
    if convert:
        tables, dtype = _int8_from_float(base_path, where)
        to_int8_embeddings(model, where, dtype, tables)
    elif saved == "int8":
        retie_int8_head(model, where)
    elif where.tied:
        model.tie_weights()
        head, embedding = model.get_submodule(where.output), model.get_submodule(where.input)
        if head.weight is not embedding.weight:
            raise SieveArtifactError(f"{where.output} could not be tied to {where.input} again")
