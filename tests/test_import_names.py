"""Import names in every context a user meets: `kernels` is Hugging Face's package (or absent), a
user's `callbacks` module is the user's, and the toolkit's folders import as `ortho_kernels` and
`ortho_callbacks` only (ortho_train/checkout.py). Each context runs in a fresh subprocess:

- `root`: `python -c` from the repository root (the root first on sys.path), installed editable;
- `tests_path`: the repository and `tests/` on PYTHONPATH, as the resume tests start train.py;
- `editable`: a user's own directory, the toolkit installed editable (install.sh);
- `wheel`: the toolkit built as a wheel and installed into a directory of its own;
- `checkout`: the repository root without any install (`python -S`: no .pth, no editable finder);
- `hub_absent`: like `checkout`, and Hugging Face's `kernels` not installed either, from the
  root and from elsewhere.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])

PROBE = """
import json, sys
import ortho_train, ortho_kernels, ortho_callbacks.sieve
from transformers.utils import is_kernels_available
out = {"ortho_kernels": ortho_kernels.__file__, "ortho_callbacks": ortho_callbacks.__file__,
       "transformers_sees_kernels": is_kernels_available()}
try:
    import kernels
except ModuleNotFoundError:
    out["kernels"] = "ModuleNotFoundError"
else:
    out["kernels"] = getattr(kernels, "__file__", None)
    out["get_kernel"] = hasattr(kernels, "get_kernel")
import callbacks
out["callbacks"] = getattr(callbacks, "__file__", None)
# every loaded module whose code lies in the toolkit's kernels or callbacks folders, by top-level name
folders = (str(__import__("pathlib").Path(ortho_kernels.__file__).parent),
           str(__import__("pathlib").Path(ortho_callbacks.__file__).parent))
out["own_names"] = sorted({name.split(".")[0] for name, module in list(sys.modules.items())
                           if str(getattr(module, "__file__", None) or "").startswith(folders)})
print(json.dumps(out))
"""


def run_probe(cwd: Path, pythonpath: list[Path], no_site: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join(map(str, pythonpath)), OMP_NUM_THREADS="1")
    flags = ["-S"] if no_site else []
    result = subprocess.run([sys.executable, *flags, "-c", PROBE], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """A user's project: its own `callbacks.py`."""
    path = tmp_path_factory.mktemp("user_project")
    (path / "callbacks.py").write_text("WHOSE = 'the user'\n")
    return path


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The toolkit built as a wheel (no build isolation: setuptools of this environment) from a
    copy of the sources (a build writes build/ and *.egg-info beside them), and installed, without
    dependencies, into a directory of its own."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", "tests"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", out / "dist", source],
                   check=True, capture_output=True, timeout=300)
    wheel = next((out / "dist").glob("ortho_train-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", out / "site", wheel],
                   check=True, capture_output=True, timeout=300)
    return out / "site"


@pytest.fixture(scope="module")
def site_without_hub_kernels(tmp_path_factory) -> Path:
    """This environment's site-packages as links, less Hugging Face's `kernels` and its metadata."""
    farm = tmp_path_factory.mktemp("site_without_kernels")
    for entry in SITE.iterdir():
        if entry.name == "kernels" or entry.name.startswith("kernels-"):
            continue
        (farm / entry.name).symlink_to(entry)
    return farm


def assert_toolkit_names(out: dict, kernels_folder: Path, callbacks_folder: Path) -> None:
    assert Path(out["ortho_kernels"]).parent == kernels_folder / "ortho_kernels"
    assert Path(out["ortho_callbacks"]).parent == callbacks_folder / "ortho_callbacks"
    assert out["own_names"] == ["ortho_callbacks", "ortho_kernels"]


def assert_hub_kernels(out: dict) -> None:
    """`kernels` is Hugging Face's installed package, and transformers sees it as such."""
    assert Path(out["kernels"]).parent.parent == SITE and out["get_kernel"], out
    assert out["transformers_sees_kernels"] is True


@pytest.mark.parametrize("context", ["root", "tests_path", "editable"])
def test_installed_editable(context, user_dir, tmp_path):
    cwd, path = {"root": (REPO, [user_dir]), "tests_path": (tmp_path, [REPO, REPO / "tests", user_dir]),
                 "editable": (user_dir, [])}[context]
    out = run_probe(cwd, path)
    assert_toolkit_names(out, REPO / "kernels", REPO / "callbacks")
    assert_hub_kernels(out)
    assert out["callbacks"] == str(user_dir / "callbacks.py")


def test_wheel_install(wheel_site, user_dir):
    out = run_probe(user_dir, [wheel_site])
    assert_toolkit_names(out, wheel_site, wheel_site)
    assert_hub_kernels(out)
    assert out["callbacks"] == str(user_dir / "callbacks.py")
    assert not (wheel_site / "kernels").exists() and not (wheel_site / "callbacks").exists()


def test_checkout_used_without_installing(user_dir):
    out = run_probe(REPO, [user_dir, SITE], no_site=True)
    assert "__editable__" not in out["ortho_kernels"]
    assert_toolkit_names(out, REPO / "kernels", REPO / "callbacks")
    assert_hub_kernels(out)
    assert out["callbacks"] == str(user_dir / "callbacks.py")


def test_hub_kernels_absent(site_without_hub_kernels, wheel_site, user_dir):
    """Away from the repository root (the wheel install) `import kernels` fails. At the root
    Python finds the folder `kernels/` (no `__init__.py`) as an empty namespace package: no code,
    not taken by transformers for the hub package (it checks for a version or a file)."""
    elsewhere = run_probe(user_dir, [site_without_hub_kernels, wheel_site], no_site=True)
    assert elsewhere["kernels"] == "ModuleNotFoundError"
    assert_toolkit_names(elsewhere, wheel_site, wheel_site)
    at_root = run_probe(REPO, [user_dir, site_without_hub_kernels], no_site=True)
    assert at_root["kernels"] is None and at_root["get_kernel"] is False
    assert_toolkit_names(at_root, REPO / "kernels", REPO / "callbacks")
    for out in (elsewhere, at_root):
        assert out["transformers_sees_kernels"] is False
        assert out["callbacks"] == str(user_dir / "callbacks.py")


def test_no_import_hooks_and_no_package_at_the_folder_names():
    for folder in ("kernels", "callbacks"):
        assert not (REPO / folder / "__init__.py").exists()  # a regular package would shadow
    sources = [p for top in ("ortho_train", "kernels", "callbacks", "train.py")
               for p in ([REPO / top] if top.endswith(".py") else (REPO / top).rglob("*.py"))]
    assert not [p for p in sources if "meta_path" in p.read_text()]


def test_pyproject_lists_every_package_and_maps_the_folders():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {str(p.parent.relative_to(REPO)).replace(os.sep, ".") for p in (REPO / "ortho_train").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"ortho_kernels", "ortho_callbacks"}
    assert setuptools["package-dir"]["ortho_kernels"] == "kernels/ortho_kernels"
    assert setuptools["package-dir"]["ortho_callbacks"] == "callbacks/ortho_callbacks"
    kernels = REPO / "kernels" / "ortho_kernels"
    assert set(setuptools["package-data"]["ortho_kernels"]) == {p.name for p in kernels.glob("_cpu_*.[ch]")}
