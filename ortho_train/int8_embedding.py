"""The 8-bit embedding / LM head of a deployed model: per-row absmax INT8 tables.

    ŵ_v = q_v · s_v,   q_v ∈ [-127, 127]^D int8,   s_v = max|w_v| / 127 fp32
    (`ortho_kernels.int8_rows`: |w − ŵ| ≤ s_v·(1/2 + 2⁻¹⁶) per weight, ≤ 1/254 of the row's max)

`to_int8_embeddings(model)` replaces the input embedding (any `nn.Embedding` subclass) and a
dense `nn.Linear` LM head by modules holding `weight_int8` (V, D) int8 and `weight_scale` (V,)
fp32 buffers; a head tied to the embedding shares the embedding's two tensors (stored once).
An embedding subclass keeps its own forward (Gemma 3 multiplies by √d after the lookup): the
new module's class derives from it with `Int8Lookup` below it in the method order, so its
`super().forward(ids)` reaches the INT8 lookup. A head that was sieved (`OrthoLinear`) stays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ortho_kernels.int8_rows import embed_int8, int8_rows_product, quantise_rows_int8
from ortho_train.models import set_submodule

EmbeddingFormat = Literal["float", "int8"]
INT8_KEYS = ("weight_int8", "weight_scale")


class Int8Lookup(nn.Embedding):
    """`nn.Embedding.forward` on INT8 rows: ŵ[ids] widened to `out_dtype`, only those rows."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's name)
        return embed_int8(input, self.weight_int8, self.weight_scale, self.out_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor of the float table's shape and dtype, for code that reads
        `.weight.dtype` (Gemma 3's scaled embedding) or `.shape`; it holds no values."""
        return torch.empty(self.num_embeddings, self.embedding_dim, dtype=self.out_dtype, device="meta")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, out_dtype={self.out_dtype}"


class Int8Head(nn.Module):
    """LM head X (..., D) -> X·Ŵᵀ (..., V), Ŵ widened a block of rows at a time."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_rows_product(x, self.weight_int8, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"


_CLASSES: dict[type, type] = {nn.Embedding: Int8Lookup}


def _int8_class(cls: type) -> type:
    """`cls` with the INT8 lookup below its own forward (`Int8Lookup` itself for nn.Embedding)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Int8{cls.__name__}", (cls, Int8Lookup), {})
    return _CLASSES[cls]


def int8_embedding(old: nn.Embedding, q: torch.Tensor, s: torch.Tensor,
                   out_dtype: torch.dtype) -> nn.Embedding:
    """A copy of `old` (its attributes, buffers and class behaviour) on INT8 rows q, s."""
    if not isinstance(old, nn.Embedding):
        raise TypeError(f"the input embedding is a {type(old).__name__}, not an nn.Embedding")
    new = _int8_class(type(old)).__new__(_int8_class(type(old)))
    new.__dict__ = dict(old.__dict__)
    new._parameters = {k: v for k, v in old._parameters.items() if k != "weight"}
    new._buffers, new._modules = dict(old._buffers), dict(old._modules)
    new.register_buffer("weight_int8", q)
    new.register_buffer("weight_scale", s)
    new.out_dtype = out_dtype
    return new


@dataclass(frozen=True)
class EmbeddingModules:
    """Where a model's tables are: the input embedding, a dense LM head (None: none, or sieved)
    and whether that head shares the embedding's weight."""

    input: str
    output: str | None
    tied: bool

    def int8_keys(self) -> list[str]:
        """The state-dict keys of the INT8 tables (the head's only when it has its own)."""
        names = [self.input] + ([self.output] if self.output and not self.tied else [])
        return [f"{name}.{key}" for name in names for key in INT8_KEYS]

    def float_keys(self) -> list[str]:
        """The float weights the INT8 tables replace (a tied head's key included)."""
        return [f"{self.input}.weight"] + ([f"{self.output}.weight"] if self.output else [])


def embedding_modules(model: nn.Module) -> EmbeddingModules:
    """The names of `model`'s input embedding and dense head, and whether the two are tied."""
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    dense_head = head if type(head) is nn.Linear else None
    tied = dense_head is not None and dense_head.weight is embedding.weight
    return EmbeddingModules(names[id(embedding)], names[id(dense_head)] if dense_head is not None else None, tied)


def int8_tables(weights: dict[str, torch.Tensor], where: EmbeddingModules) -> dict[str, torch.Tensor]:
    """The INT8 state entries (`where.int8_keys()`) quantised from the float weights by key."""
    out = {}
    for name in [where.input] + ([where.output] if where.output and not where.tied else []):
        q, s = quantise_rows_int8(weights[f"{name}.weight"])
        out |= {f"{name}.weight_int8": q, f"{name}.weight_scale": s}
    return out


def to_int8_embeddings(model: nn.Module, where: EmbeddingModules, out_dtype: torch.dtype,
                       tables: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap the tables of `where` for INT8 modules (in place), on `tables` (by state key) or,
    when None, on empty meta tensors of the right shapes to `load_state_dict(assign=True)` into."""
    embedding = model.get_submodule(where.input)
    v, d = embedding.num_embeddings, embedding.embedding_dim
    q, s = _table(tables, where.input, v, d)
    new = int8_embedding(embedding, q, s, out_dtype)
    set_submodule(model, where.input, new)
    if where.output is not None:
        head = model.get_submodule(where.output)
        if where.tied:
            set_submodule(model, where.output, Int8Head(new.weight_int8, new.weight_scale))
        else:
            set_submodule(model, where.output, Int8Head(*_table(tables, where.output, head.out_features,
                                                                head.in_features)))
    return model


def retie_int8_head(model: nn.Module, where: EmbeddingModules) -> None:
    """Point a tied INT8 head at the embedding's tensors again (after an assign-load)."""
    if where.output is not None and where.tied:
        embedding, head = model.get_submodule(where.input), model.get_submodule(where.output)
        head.weight_int8, head.weight_scale = embedding.weight_int8, embedding.weight_scale


def _table(tables, name: str, v: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tables is None:
        return (torch.empty(v, d, dtype=torch.int8, device="meta"),
                torch.empty(v, dtype=torch.float32, device="meta"))
    return tables[f"{name}.weight_int8"], tables[f"{name}.weight_scale"]
