"""The CPU cores this process may use, for sizing host-side thread pools.

`os.cpu_count()` counts the machine's cores. A process pinned to some of them (taskset, a batch
scheduler's cpuset) or held to a CPU quota by its container (`docker --cpus`, a Kubernetes CPU
limit: the cgroup's `cpu.max`, or `cpu.cfs_quota_us` under cgroup v1) gets fewer, and a thread
pool sized by the machine makes its threads queue for the same few cores. `usable_cpu_count`
takes the smaller of the affinity and the tightest quota on the process's cgroup path, rounded
up (a quota of 1.5 cores still runs two threads usefully).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Where the cgroup file systems are mounted, and where the kernel names this process's groups.
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpu_count(*, cgroup_root: str | Path | None = None,
                     self_cgroup: str | Path | None = None) -> int:
    """Cores this process may use: its CPU affinity, capped by any cgroup CPU quota (v1 or v2)
    on its cgroup's path up to the root; at least 1. Unreadable cgroup files are ignored."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                     # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(Path(cgroup_root or CGROUP_ROOT), Path(self_cgroup or SELF_CGROUP))
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cgroup_cpu_quota(root: Path, self_cgroup: Path) -> float | None:
    """The tightest CPU quota, in cores, over the process's cgroup directories and their
    parents (a quota on a parent limits its children too), or None when there is none."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":                                    # cgroup v2: "0::/path"
            mounts, read = [root, root / "unified"], _v2_quota
        elif "cpu" in controllers.split(","):                    # cgroup v1: "4:cpu,cpuacct:/path"
            mounts, read = [root / controllers, root / "cpu"], _v1_quota
        else:
            continue
        for mount in mounts:
            directory = mount / path.strip("/")
            for d in [directory, *directory.parents]:
                quota = read(d)
                if quota is not None:
                    quotas.append(quota)
                if d == mount:
                    break
    return min(quotas, default=None)


def _v2_quota(directory: Path) -> float | None:
    """cpu.max holds "QUOTA PERIOD" (microseconds) or "max PERIOD"."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):                                # absent or garbled
        return None
    return _cores(quota, period)


def _v1_quota(directory: Path) -> float | None:
    """cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us."""
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text()
        period = (directory / "cpu.cfs_period_us").read_text()
    except OSError:
        return None
    return _cores(quota, period)


def _cores(quota: str, period: str) -> float | None:
    """quota / period as a positive number of cores, or None ("max", -1, 0 or garbled)."""
    try:
        cores = float(quota) / float(period)
    except (ValueError, ZeroDivisionError):
        return None
    return cores if cores > 0 else None
