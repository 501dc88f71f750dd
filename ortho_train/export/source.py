"""What an exporter reads: a saved sieved-model directory, at α = 0 or α = 1.

    source = read_sieved(directory, alpha=0.0)   # base.safetensors only: the ortho file is never opened
    source.bases["model.layers.0.mlp.up_proj"]    # the layer's packed base stream (QuantisedBase)
    source.weight("model.layers.0.mlp.up_proj")   # dense float32 (N, K) at the chosen α

The dense weight of a sieved linear is the one `OrthoLinear.effective_weight` computes:

    W(α) = (q − z) · s  (group-wise, `ortho_kernels.group_dequantise`)  +  α · W_ortho

with W_ortho the sparse ortho stream scattered into (N, K) (flat index i·K + j); α = 1 means 1 in
every layer (the per-layer α saved in `sieve_config.json` is not applied). An α = 0 source
reads the base file alone, so nothing an exporter writes from it can hold ortho data. Every
other tensor of the model (embeddings, norms, an unsieved head) comes from the base file as saved.
Files are checked as `load_sieved` checks them (format, checksums, pair id).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ortho_kernels import QuantisedBase
from ortho_train.ortho_linear import ORTHO_KEYS
from ortho_train.sieve.artifacts import SieveArtifactError, _read_config, _read_stream

ALPHAS = (0.0, 1.0)
BASE_KEYS = ("qweight", "scales", "zeros")


@dataclass
class SievedSource:
    """A sieved model as exporters see it (module docstring).

    Attributes:
        directory: the sieved-model directory.
        model_config: the Hugging Face config dict it was saved with (`model_type` included).
        alpha: 0.0 (base stream only) or 1.0 (base + ortho).
        bases: sieved linear name → its base stream.
        biases: sieved linear name → its bias (float32), for those that have one.
        tensors: every other tensor of the base file, by its state-dict name.
        ortho: sieved linear name → dense ortho weight (N, K) float32; empty at α = 0.
    """

    directory: Path
    model_config: dict
    alpha: float
    bases: dict[str, QuantisedBase]
    biases: dict[str, Tensor]
    tensors: dict[str, Tensor]
    ortho: dict[str, Tensor] = field(default_factory=dict)

    def weight(self, name: str) -> Tensor:
        """Dense float32 weight (N, K) of the linear `name` at `alpha` (sieved or not)."""
        if name in self.bases:
            w = self.bases[name].dequantise()  # (N, K) fp32, exact
            return w + self.ortho[name] if name in self.ortho else w
        return self.tensors[f"{name}.weight"].float()

    @property
    def tied(self) -> bool:
        """The LM head shares the input embedding (no head tensor of its own)."""
        return bool(self.model_config.get("tie_word_embeddings", False))


def _ortho_dense(layout: dict, indices: Tensor, values: Tensor) -> Tensor:
    """Scatter the COO ortho stream (flat i·K + j, fp16 values) into a dense (N, K) float32."""
    n, k = layout["out_features"], layout["in_features"]
    dense = torch.zeros(n * k, dtype=torch.float32)
    dense[indices.long()] = values.float()
    return dense.view(n, k)  # (N·K,) → (N, K)


def read_sieved(directory: str | Path, alpha: float = 0.0, verify: bool = True) -> SievedSource:
    """Read a sieved-model directory for export (module docstring); a clear error names what is wrong."""
    if float(alpha) not in ALPHAS:
        raise ValueError(f"--alpha must be 0 (the public base stream) or 1 (base + ortho merged), got {alpha}")
    directory = Path(directory)
    if not directory.is_dir():
        raise SieveArtifactError(f"{directory} is not a directory: expected a sieved model saved by save_sieved")
    config = _read_config(directory)
    if config.get("embedding", {}).get("format", "float") != "float":
        raise SieveArtifactError(f"{directory} was saved with embedding={config['embedding']['format']!r}: the "
                                 f"exporters write float tables; save it again with save_sieved(..., embedding='float')")
    state = _read_stream(directory, config, "base", verify)
    stray = [key for key in state if key.rsplit(".", 1)[-1] in ORTHO_KEYS]
    if stray:
        raise SieveArtifactError(f"the base file of {directory} holds ortho tensors ({stray[:3]}…)")
    bases, biases = {}, {}
    for name, layout in config["layers"].items():
        missing = [f"{name}.{key}" for key in BASE_KEYS if f"{name}.{key}" not in state]
        if missing:
            raise SieveArtifactError(f"the base file of {directory} lacks {missing} of the sieved layer {name}")
        qweight, scales, zeros = (state.pop(f"{name}.{key}") for key in BASE_KEYS)
        shape = (layout["out_features"], layout["in_features"])
        bases[name] = QuantisedBase(qweight, scales, zeros, shape, layout["group_size"], layout["bits"])
        if f"{name}.bias" in state:
            biases[name] = state.pop(f"{name}.bias").float()
    ortho = {}
    if float(alpha) == 1.0:
        stream = _read_stream(directory, config, "ortho", verify)
        for name, layout in config["layers"].items():
            if layout["nnz"]:
                ortho[name] = _ortho_dense(layout, stream[f"{name}.ortho_indices"], stream[f"{name}.ortho_values"])
    return SievedSource(directory, dict(config["model_config"]), float(alpha), bases, biases, state, ortho)
