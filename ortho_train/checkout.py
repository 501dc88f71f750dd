"""A checkout used without `pip install`: make `ortho_kernels` and `ortho_callbacks` importable.

The repository's top-level folders `kernels/` and `callbacks/` have no `__init__.py`: each holds
one regular package one level down (`kernels/ortho_kernels/`, `callbacks/ortho_callbacks/`). So
with the repository root on `sys.path` (`python train.py`, `python -c` from the root, pytest)
the names `kernels` and `callbacks` stay free: Python's path finder prefers a regular package
anywhere on the path to a folder without `__init__.py`, so `import kernels` gives Hugging Face's
kernel-hub package (a dependency of transformers, imported by bitsandbytes) and a user's own
`callbacks` module is found as it would be without the toolkit. The toolkit's own code imports
under one name each, `ortho_kernels` and `ortho_callbacks`.

An install (editable or wheel) maps those two names to their folders (pyproject's
`package-dir`). A checkout used without installing has no such mapping: `add_checkout_folders`
appends the two folders to the end of `sys.path` (only the folders, which hold nothing but the
one package each; at the end, so an installed copy still wins). No import hook is involved.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"ortho_kernels": ROOT / "kernels", "ortho_callbacks": ROOT / "callbacks"}


def add_checkout_folders() -> None:
    """Append each folder whose package is not importable yet (a checkout, not installed)."""
    for package, folder in FOLDERS.items():
        if not (folder / package / "__init__.py").is_file() or str(folder) in sys.path:
            continue  # a wheel install: the folders are not beside ortho_train
        if importlib.util.find_spec(package) is None:
            sys.path.append(str(folder))
