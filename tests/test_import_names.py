"""The kernels/ folder is `ortho_kernels`; `kernels` (Hugging Face's package, which bitsandbytes
imports) never resolves to it, even with the repository root first on sys.path."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# bitsandbytes runs `from kernels import get_kernel` when it is imported on a CPU with AVX512-BF16
# (and on MPS); the probe runs that import itself, so it checks the same resolution on every CPU
# without importing bitsandbytes (~3 s of the probe's start-up).
PROBE = """
import importlib.util, sys
import ortho_train, ortho_kernels
from transformers import LlamaConfig  # transformers tests find_spec("kernels") before it imports it
print("ortho_kernels", ortho_kernels.__file__)
assert sys.path[0] in ("", {repo!r}), sys.path[0]
try:
    from kernels import get_kernel  # what bitsandbytes runs at import on AVX512-BF16 CPUs and MPS
except ImportError as error:
    print("kernels", type(error).__name__, "spec", importlib.util.find_spec("kernels"))
else:
    print("kernels hub", get_kernel.__module__, importlib.util.find_spec("kernels").origin)
"""


def test_kernels_never_resolves_to_the_repository_folder():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO))], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    own = Path(lines["ortho_kernels"]).parent
    assert own.name == "kernels" and (own / "_cpu_int4_gemv.c").is_file()  # the folder, as ortho_kernels
    found = lines["kernels"]
    if found.startswith("hub"):  # Hugging Face's package is installed: it, not a copy of the folder
        assert not (Path(found.split()[-1]).parent / "_cpu_int4_gemv.c").exists(), found
    else:
        # absent: not importable and no spec, so libraries that test find_spec (transformers,
        # bitsandbytes) see it as not installed
        assert found == "ModuleNotFoundError spec None", found
    assert "get_kernel" not in result.stderr and str(REPO / "kernels") not in result.stderr + found


def test_pyproject_lists_every_package_and_maps_the_kernels_folder():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {str(p.parent.relative_to(REPO)).replace(os.sep, ".")
               for top in ("ortho_train", "callbacks") for p in (REPO / top).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"ortho_kernels"}
    assert setuptools["package-dir"]["ortho_kernels"] == "kernels"
    assert set(setuptools["package-data"]["ortho_kernels"]) == {p.name for p in (REPO / "kernels").glob("_cpu_*.[ch]")}
