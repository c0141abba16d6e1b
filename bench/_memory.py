"""Peak resident memory of the running process (Linux /proc), shared by the CPU benchmarks."""

from __future__ import annotations


def reset_peak_memory() -> None:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_mb() -> float:
    """Peak resident memory of this process since start or the last reset, in MB."""
    return _status_mb("VmHWM")


def resident_memory_mb() -> float:
    """Resident memory of this process now, in MB."""
    return _status_mb("VmRSS")
