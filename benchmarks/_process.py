"""Process-level measurements the benchmarks share: resident and peak memory, page faults, the
machine's load, glibc's handling of freed memory, and progress lines on stderr."""

from __future__ import annotations

import os
import sys
import time


def progress(message: str) -> None:
    """Print ``message`` with the time of day to stderr (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> float:
    """The 1-minute load average (other processes' load; nan where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def rss_bytes() -> int:
    """Resident set size now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS of this process's own memory.

    On Linux the high-water mark of the current address space (``VmHWM``): ``ru_maxrss`` also
    counts the parent's RSS at the time of the fork, which can be larger than the child's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory mapped (no trimming, no per-chunk mmap), as jemalloc does.

    glibc's default returns a large freed block at the top of the heap to the system, so a step
    whose peak is higher than the previous step's faults its pages in again (about 1 µs per
    4 KiB page). Returns whether the setting was applied (glibc on Linux only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    size = 1 << 30
    return bool(libc.mallopt(m_trim_threshold, size)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def apply_malloc_setting(retain: bool) -> bool:
    """With ``retain``, ask glibc to keep freed memory (:func:`retain_freed_memory`); whether it did."""
    return retain_freed_memory() if retain else False
