"""Thread count from the cores a process may use, and the passive OpenMP wait train.py sets."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ortho_train.threads import available_cores, configure_threads, set_passive_wait


def test_cgroup_quota_caps_the_affinity(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == affinity  # no cgroup files: the affinity alone
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads at most
    assert available_cores(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU -> 1
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path) == 1


def test_affinity_is_honoured_in_a_child_process():
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from ortho_train.threads import configure_threads; print(configure_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_explicit_settings_win():
    previous = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be"):
            configure_threads(0)
    finally:
        torch.set_num_threads(previous)
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_passive_wait(environ) == {} and environ["OMP_WAIT_POLICY"] == "ACTIVE"
    environ = {}
    assert set_passive_wait(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_train_py_sets_passive_wait_before_torch_loads():
    """Run train.py's imports in a child whose first `import torch` reports OMP_WAIT_POLICY as it
    is at that moment and exits: OpenMP reads it once, when torch loads, so later is too late."""
    code = (
        "import os, sys, runpy, importlib.abc\n"
        "class StopAtTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            print(os.environ.get('OMP_WAIT_POLICY'), flush=True); os._exit(0)\n"
        "sys.meta_path.insert(0, StopAtTorch())\n"
        "sys.argv = ['train.py']; runpy.run_path('train.py', run_name='not_main')\n"
        "print('torch never imported')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines() == ["PASSIVE"]
