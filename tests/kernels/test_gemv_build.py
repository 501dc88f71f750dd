"""Building the CPU GEMV: each fallback says its real reason (disabled, not Linux, not x86-64,
no AVX2, no compiler, the compiler's error), the op's library carries no OpenMP runtime, and
the OpenMP comparison variant is a separate build that may fail on its own."""
import stat
import sys
from pathlib import Path

import pytest

from ortho_kernels import cpu_gemv

AVAILABLE = not isinstance(cpu_gemv.library(), str)
REAL_CC = cpu_gemv._compiler()


@pytest.fixture
def linux_avx2(monkeypatch, tmp_path):
    """A host that passes every platform check, whatever this one is; a fresh cache."""
    monkeypatch.delenv("ORTHO_TRAIN_NO_GEMV", raising=False)
    monkeypatch.setenv("ORTHO_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_gemv.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_gemv.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda: {"avx2", "fma", "f16c", "sse2"})
    monkeypatch.setattr(cpu_gemv, "_OMP_LIB", None)
    return monkeypatch


def _script(tmp_path: Path, body: str) -> str:
    """An executable 'compiler' running `body` (Python) with the compiler's argv."""
    path = tmp_path / "fake-cc"
    path.write_text(f"#!{sys.executable}\nimport os, subprocess, sys\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("system, machine, flags, reason", [
    ("Darwin", "x86_64", {"avx2", "fma", "f16c"}, "not Linux (Darwin): the thread pool uses Linux futexes"),
    ("Windows", "AMD64", None, "not Linux (Windows)"),
    ("Linux", "aarch64", set(), "machine aarch64 is not x86-64"),
    ("Linux", "x86_64", {"avx", "fma", "f16c"}, "CPU lacks ['avx2']"),
    ("Linux", "x86_64", None, "the CPU's flags cannot be read from /proc/cpuinfo"),
])
def test_each_platform_fallback_names_its_reason(linux_avx2, system, machine, flags, reason):
    linux_avx2.setattr(cpu_gemv.platform, "system", lambda: system)
    linux_avx2.setattr(cpu_gemv.platform, "machine", lambda: machine)
    linux_avx2.setattr(cpu_gemv, "_cpu_flags", lambda: flags)
    assert cpu_gemv._load().startswith(reason)
    assert cpu_gemv.omp_library().startswith(reason)


def test_disabled_by_environment(linux_avx2):
    linux_avx2.setenv("ORTHO_TRAIN_NO_GEMV", "1")
    assert cpu_gemv._load() == "disabled by ORTHO_TRAIN_NO_GEMV=1"


def test_no_compiler_is_named(linux_avx2):
    linux_avx2.setattr(cpu_gemv.shutil, "which", lambda name: None)
    linux_avx2.delenv("CC", raising=False)
    assert cpu_gemv._load() == "no C compiler (gcc/cc) on PATH"
    linux_avx2.setenv("CC", "no-such-cc")
    assert cpu_gemv._load() == "no C compiler: CC='no-such-cc' is not on PATH"


def test_a_build_error_carries_the_compiler_stderr_tail(linux_avx2, tmp_path):
    cc = _script(tmp_path, "sys.stderr.write('x' * 5000 + '\\nfatal: immintrin.h missing\\n'); sys.exit(3)")
    linux_avx2.setenv("CC", cc)
    reason = cpu_gemv._load()
    assert reason.startswith(f"building _cpu_int4_gemv.c failed: {cc} exited with status 3: ")
    assert reason.endswith("fatal: immintrin.h missing") and len(reason) < cpu_gemv.STDERR_TAIL + 200
    assert not list((tmp_path / "cache").glob("*.so*"))  # no half-written library left behind


def test_the_op_library_is_built_without_openmp(linux_avx2, tmp_path):
    log = tmp_path / "argv.txt"
    cc = _script(tmp_path, f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n'); sys.exit(1)")
    linux_avx2.setenv("CC", cc)
    cpu_gemv._load()
    assert "-fopenmp" not in log.read_text() and "-pthread" in log.read_text()
    cpu_gemv.omp_library()  # the benchmark's variant: a second build, with -fopenmp
    assert "-fopenmp" in log.read_text().splitlines()[1].split()


@pytest.mark.skipif(not AVAILABLE or REAL_CC is None, reason="needs the compiled CPU GEMV")
def test_a_compiler_without_openmp_keeps_the_op_and_names_the_omp_failure(linux_avx2, tmp_path):
    cc = _script(tmp_path, "if '-fopenmp' in sys.argv:\n"
                           "    sys.stderr.write('error: unsupported option -fopenmp\\n'); sys.exit(1)\n"
                           f"sys.exit(subprocess.call([{REAL_CC!r}, *sys.argv[1:]]))")
    linux_avx2.setenv("CC", cc)
    lib = cpu_gemv._load()
    assert not isinstance(lib, str), lib
    assert "GOMP" not in Path(lib._name).read_bytes().decode("latin-1")  # no OpenMP runtime linked
    assert cpu_gemv.omp_library().endswith("error: unsupported option -fopenmp")  # the benchmark's row names it


@pytest.mark.skipif(not AVAILABLE, reason="needs the compiled CPU GEMV")
def test_the_openmp_variant_is_built_only_when_asked(linux_avx2):
    omp = cpu_gemv.omp_library()
    if isinstance(omp, str):
        pytest.skip(f"OpenMP variant unavailable here: {omp}")
    assert Path(omp._name) != Path(cpu_gemv.library()._name)
    assert omp.ortho_int4_gemv_omp is not None  # what the benchmark calls
    assert not hasattr(cpu_gemv.library(), "ortho_int4_gemv_omp")  # the op's library holds the op only
