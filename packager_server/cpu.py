"""How many CPUs this container may use: the cgroup limit, not the host's core count.

MLflow's image starts one worker per *host* CPU, so a pod limited to 1 CPU on a 64-core
node starts 64 model copies. We read the CPU quota instead (cgroup v2 ``cpu.max``, or v1
``cpu.cfs_quota_us``/``cpu.cfs_period_us``), and the scheduler affinity mask.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in CPUs (e.g. 1.5), or None when unlimited or unknown."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        limit = None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    else:
        return limit
    for base in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((base / "cpu.cfs_quota_us").read_text())
            period_us = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs usable by this process: min(affinity mask, cgroup quota rounded up), >= 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)
