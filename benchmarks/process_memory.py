"""This process's resident memory, in MB, for the benchmarks' peak-memory figures (Linux).

The benchmarks run each side in its own process, so a process's peak is that side's peak.
`reset_peak` (kernel permitting) lowers the peak to the current RSS, so that a later
`status_mb("VmHWM")` measures one section of a run.
"""

from __future__ import annotations

import resource


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB ("VmRSS": now, "VmHWM": peak); NaN without
    one (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024      # the kernel writes kB
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Resident memory now, MB."""
    return status_mb("VmRSS")


def peak_mb() -> float:
    """Peak resident memory of this process so far (since the last `reset_peak`), MB; where
    /proc is missing, getrusage's lifetime peak."""
    peak = status_mb("VmHWM")
    if peak == peak:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux units: KiB


def reset_peak() -> bool:
    """Lowers the peak (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
