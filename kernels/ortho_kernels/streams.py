"""Containers for the two streams of a dual-stream linear, W ~= dequant(base) + alpha * ortho.

`QuantisedBase` holds a packed group-wise INT-k weight (see `ortho_kernels.packing` for the
convention); `OrthoStream` holds the sparse fp16 residual as COO with row-major flat int32
indices. Both are plain dataclasses over tensors so that a module can keep the tensors as
separate buffers (base file alone = complete α=0 model) and wrap them on each call; they
compare by identity (`eq=False`) so they can key caches.

Validation raises `ValueError` naming the problem. The O(nnz) content checks of
`OrthoStream` (sorted, unique, in range) run at construction unless `check=False` is passed,
which a hot path may do once its buffers were validated at load.
"""
from __future__ import annotations

import math
from dataclasses import InitVar, dataclass
from typing import NamedTuple

import torch

from ortho_kernels.packing import (
    COO_ENTRY_BITS,
    SUPPORTED_BITS,
    group_dequantise,
    group_quantise,
    pack_bits,
    packed_width,
    unpack_bits,
)

_INT32_MAX = 2**31 - 1


def _shape2(shape) -> tuple[int, int]:
    if len(shape) != 2 or any(int(d) < 1 for d in shape):
        raise ValueError(f"shape must be (N, K) with positive sizes, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


@dataclass(eq=False)
class QuantisedBase:
    """Group-wise INT-k base stream of a weight (N, K).

    qweight: uint8 (N, ceil(K*bits/8)) packed codes (`pack_bits`; for bits=4 two per byte).
    scales, zeros: fp16 (N, G), G = ceil(K / group_size).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple[int, int]
    group_size: int = 128
    bits: int = 4

    def __post_init__(self) -> None:
        self.shape = _shape2(self.shape)
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        n, k = self.shape
        want_q = (n, packed_width(k, self.bits))
        if self.qweight.dtype != torch.uint8 or tuple(self.qweight.shape) != want_q:
            raise ValueError(f"qweight must be uint8 {want_q} for shape {self.shape}, bits="
                             f"{self.bits}; got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        want_s = (n, self.n_groups)
        for name, t in (("scales", self.scales), ("zeros", self.zeros)):
            if t.dtype != torch.float16 or tuple(t.shape) != want_s:
                raise ValueError(f"{name} must be float16 {want_s} (K={k}, group_size="
                                 f"{self.group_size}); got {t.dtype} {tuple(t.shape)}")
            if t.device != self.qweight.device:
                raise ValueError(f"{name} is on {t.device} but qweight on {self.qweight.device}")

    @classmethod
    def from_dense(cls, w: torch.Tensor, bits: int = 4, group_size: int = 128) -> "QuantisedBase":
        """RTN-quantise a dense weight (N, K)."""
        codes, scales, zeros = group_quantise(w, bits=bits, group_size=group_size)
        return cls(pack_bits(codes, bits), scales, zeros, tuple(w.shape), group_size, bits)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 (N, K)."""
        return unpack_bits(self.qweight, self.bits, self.shape[1])

    def dequantise(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (q - zero) * scale as `dtype` (N, K)."""
        return group_dequantise(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    def to(self, device) -> "QuantisedBase":
        return QuantisedBase(self.qweight.to(device), self.scales.to(device),
                             self.zeros.to(device), self.shape, self.group_size, self.bits)

    def effective_bits(self, ortho: "OrthoStream | None" = None) -> float:
        """Exact stored bits per weight: packed codes + fp16 scales/zeros (+ COO entries)."""
        n, k = self.shape
        total = self.qweight.numel() * 8 + (self.scales.numel() + self.zeros.numel()) * 16
        if ortho is not None:
            total += ortho.nnz * COO_ENTRY_BITS
        return total / (n * k)


class CSR(NamedTuple):
    """Compressed sparse rows: crow int32 (N+1,), col int32 (nnz,), values (nnz,)."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]


class ELL(NamedTuple):
    """ELLPACK: col int32 (N, L) and values (N, L), L = max row length; padding has value 0."""

    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]


@dataclass(eq=False)
class OrthoStream:
    """Sparse high-precision stream of a weight (N, K) in COO.

    indices: int32 (nnz,) strictly increasing row-major flat positions i*K + j.
    values: fp16 (nnz,).
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        self.shape = _shape2(self.shape)
        n, k = self.shape
        if n * k > _INT32_MAX + 1:
            raise ValueError(f"shape {self.shape} has {n * k} entries; int32 flat indices "
                             f"address at most 2^31")
        if self.indices.dtype != torch.int32 or self.indices.dim() != 1:
            raise ValueError(f"indices must be a 1-D int32 tensor, got {self.indices.dtype} "
                             f"{tuple(self.indices.shape)}")
        if self.values.dtype != torch.float16 or self.values.dim() != 1:
            raise ValueError(f"values must be a 1-D float16 tensor, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        if self.indices.numel() != self.values.numel():
            raise ValueError(f"indices ({self.indices.numel()}) and values "
                             f"({self.values.numel()}) differ in length")
        if self.indices.device != self.values.device:
            raise ValueError(f"indices on {self.indices.device} but values on {self.values.device}")
        if check:
            self.validate()

    def validate(self) -> None:
        """O(nnz) content checks: strictly increasing (sorted, no duplicates), in range."""
        idx = self.indices
        if idx.numel() == 0:
            return
        n, k = self.shape
        if int(idx.min()) < 0 or int(idx.max()) >= n * k:
            raise ValueError(f"indices out of range [0, {n * k}) for shape {self.shape}")
        steps = idx[1:] - idx[:-1]
        if steps.numel() and int(steps.min()) <= 0:
            kind = "duplicate" if bool((steps == 0).any()) else "unsorted"
            raise ValueError(f"indices must be strictly increasing row-major (found {kind} "
                             f"entries); sort them and merge duplicates")

    # ---- construction
    @classmethod
    def empty(cls, shape, device=None) -> "OrthoStream":
        return cls(torch.empty(0, dtype=torch.int32, device=device),
                   torch.empty(0, dtype=torch.float16, device=device), shape)

    @classmethod
    def from_dense(cls, m: torch.Tensor) -> "OrthoStream":
        """All non-zero entries of a dense (N, K) matrix (values rounded to fp16)."""
        return cls.from_mask(m, m != 0)

    @classmethod
    def from_mask(cls, w: torch.Tensor, mask: torch.Tensor) -> "OrthoStream":
        """Entries of w (N, K) where the boolean mask is set."""
        if w.dim() != 2 or mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"need w (N, K) and a bool mask of the same shape, got "
                             f"{tuple(w.shape)} and {mask.dtype} {tuple(mask.shape)}")
        flat = mask.reshape(-1).nonzero().squeeze(1)  # (nnz,) sorted ascending
        values = w.reshape(-1)[flat].to(torch.float16)
        return cls(flat.to(torch.int32), values, tuple(w.shape))

    @classmethod
    def top_fraction(cls, w: torch.Tensor, rho: float,
                     score: torch.Tensor | None = None) -> "OrthoStream":
        """The ceil(rho * N*K) entries of w with the largest score (default |w|)."""
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {rho}")
        score = w.abs() if score is None else score
        if score.shape != w.shape:
            raise ValueError(f"score {tuple(score.shape)} must match w {tuple(w.shape)}")
        nnz = math.ceil(rho * w.numel())
        top = score.reshape(-1).float().topk(nnz).indices  # (nnz,)
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[top] = True
        return cls.from_mask(w, mask.reshape(w.shape))  # (N, K)

    # ---- views
    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.shape[1]
        return self.indices // k, self.indices % k

    def to(self, device) -> "OrthoStream":
        return OrthoStream(self.indices.to(device), self.values.to(device), self.shape, check=False)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        dense = torch.zeros(n * k, dtype=dtype, device=self.device)
        dense[self.indices.long()] = self.values.to(dtype)
        return dense.reshape(n, k)  # (N, K)

    def to_csr(self) -> CSR:
        n, _ = self.shape
        rows, cols = self.rows_cols()
        counts = torch.bincount(rows.long(), minlength=n)  # (N,)
        crow = torch.zeros(n + 1, dtype=torch.int32, device=self.device)
        crow[1:] = counts.cumsum(0)
        return CSR(crow, cols.to(torch.int32), self.values, self.shape)

    def to_ell(self) -> ELL:
        n, _ = self.shape
        crow, col, values, _ = self.to_csr()
        counts = (crow[1:] - crow[:-1]).long()  # (N,)
        width = int(counts.max()) if n and self.nnz else 0
        rows = torch.repeat_interleave(torch.arange(n, device=self.device), counts)  # (nnz,)
        slot = torch.arange(self.nnz, device=self.device) - crow[:-1].long()[rows]  # (nnz,)
        ell_col = torch.zeros(n, width, dtype=torch.int32, device=self.device)
        ell_val = torch.zeros(n, width, dtype=values.dtype, device=self.device)
        ell_col[rows, slot] = col
        ell_val[rows, slot] = values
        return ELL(ell_col, ell_val, self.shape)
