"""The import name of the repository's `kernels/` folder is `ortho_kernels`, never `kernels`.

`kernels` is the name of Hugging Face's kernel-hub package, which bitsandbytes imports
(`from kernels import get_kernel`, on CPUs with AVX512-BF16 and on MPS). The folder is
installed as `ortho_kernels` (pyproject's `package-dir`), but wherever the repository root is
on `sys.path` (`python train.py` run from the root, pytest) Python's path finder would also hand
the folder out under its directory name, and bitsandbytes would report "cannot import name
'get_kernel'" from it. `install()`, run by `import ortho_train`, adds two import finders:

- first in `sys.meta_path`, one for `kernels`: it looks along `sys.path` past every folder that
  holds the toolkit's kernels (the file `_cpu_int4_gemv.c` marks them) and returns the Hugging
  Face package where one is installed. Where none is, `install()` records `kernels` as absent
  (`sys.modules["kernels"] = None`, Python's own marker for "not importable"): `import kernels`
  raises `ModuleNotFoundError` and `importlib.util.find_spec("kernels")` is None, which is what
  libraries test before they import it. (A spec whose loading raised would not do: transformers
  takes a found spec for an installed package, then fails reading its version, and every
  `from transformers import …` of the process breaks.);
- last, one for `ortho_kernels`: the folder itself, where the package is not installed (a
  checkout used from its root without `pip install -e .`).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

HUB_NAME = "kernels"
OWN_NAME = "ortho_kernels"
FOLDER = Path(__file__).resolve().parents[1] / "kernels"
MARKER = "_cpu_int4_gemv.c"


def is_own_kernels(spec: importlib.machinery.ModuleSpec | None) -> bool:
    """The spec is (a copy of) the toolkit's `kernels/` folder."""
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    return any((Path(location) / MARKER).is_file() for location in locations)


def hub_spec() -> importlib.machinery.ModuleSpec | None:
    """The spec of Hugging Face's `kernels` along `sys.path`, skipping copies of the folder."""
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec(HUB_NAME, [entry])
        if spec is not None and not is_own_kernels(spec):
            return spec
    return None


class HubKernelsFinder(importlib.abc.MetaPathFinder):
    """`kernels` is Hugging Face's package or absent, never the toolkit's folder."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != HUB_NAME:
            return None
        return hub_spec()


class OwnKernelsFinder(importlib.abc.MetaPathFinder):
    """`ortho_kernels` is the repository's `kernels/` folder when no installed copy was found."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != OWN_NAME or not (FOLDER / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(OWN_NAME, FOLDER / "__init__.py",
                                                      submodule_search_locations=[str(FOLDER)])


def install() -> None:
    """Add both finders once: the `kernels` one first, the `ortho_kernels` fallback last."""
    if not any(isinstance(f, HubKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, HubKernelsFinder())
    if not any(isinstance(f, OwnKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(OwnKernelsFinder())
    loaded = sys.modules.get(HUB_NAME)
    if loaded is not None and is_own_kernels(getattr(loaded, "__spec__", None)):
        del sys.modules[HUB_NAME]  # imported under the wrong name before the toolkit: forget it
    if HUB_NAME not in sys.modules and hub_spec() is None:
        sys.modules[HUB_NAME] = None  # not installed: `import kernels` fails, find_spec is None
