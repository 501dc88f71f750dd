"""What an export wrote, tensor by tensor: stored type, exact or rounded, max |stored − source|."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExportReport:
    """What an export wrote: per tensor its type, whether it is exact, and max |stored − source|."""

    path: Path
    format: str
    alpha: float
    tensors: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, kind: str, exact: bool, max_abs_error: float) -> None:
        self.tensors[name] = {"type": kind, "exact": exact, "max_abs_error": max_abs_error}

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "alpha": self.alpha,
                "max_abs_error": self.max_abs_error, "tensors": self.tensors}

    @property
    def max_abs_error(self) -> float:
        return max((t["max_abs_error"] for t in self.tensors.values()), default=0.0)

    def summary(self) -> str:
        lossy = sorted(n for n, t in self.tensors.items() if not t["exact"])
        return (f"{self.path}: {self.format}, α = {self.alpha:g}, {len(self.tensors)} tensors, "
                f"{len(lossy)} rounded (max |error| {self.max_abs_error:.3g}), the rest exact")
