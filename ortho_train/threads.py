"""How many CPU threads a run uses, and how they wait.

`available_cores()` counts the cores this process may actually run on: its CPU affinity
(`taskset`, `numactl`, a scheduler's cpuset) capped by a cgroup CPU quota (`cpu.max` of
cgroup v2 or `cpu.cfs_quota_us / cpu.cfs_period_us` of v1, as container runtimes set it),
never the machine's core count, which `torch` uses by default.

`PASSIVE_WAIT` is the OpenMP environment `train.py` sets (unless the user set it) before
torch is imported: torch's OpenMP threads then sleep at the end of a parallel region instead
of spinning. When another process holds a core, a spinning thread burns the time slice its
descheduled peer needs, and every parallel region waits for that peer: measured by
`python benchmarks/cpu_threads.py`, numbers in docs/results.md.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota, or None when unlimited or unknown."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file():
            quota = int(v1_quota.read_text())
            return None if quota <= 0 else quota / int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its affinity, capped by the cgroup quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def set_passive_wait(environ=os.environ) -> dict[str, str]:
    """Set `PASSIVE_WAIT` in `environ` where the user has not chosen; returns what was set.
    Must run before torch is imported (OpenMP reads it once, at load)."""
    chosen = {}
    for key, value in PASSIVE_WAIT.items():
        if key not in environ:
            environ[key] = chosen[key] = value
    return chosen


def configure_threads(threads: int | None = None) -> int:
    """`torch.set_num_threads` to `threads`, or to `available_cores()` when None (an explicit
    OMP_NUM_THREADS in the environment wins over that default). Returns the count set."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be ≥ 1 (or None: the available cores), got {threads}")
    if threads is None:
        from_env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else available_cores()
    torch.set_num_threads(threads)
    return threads
