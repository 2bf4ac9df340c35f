"""What Linux tells this process about itself through ``/proc`` and ``/sys``: run-queue waits of its threads, the
kernel's transparent-huge-page mode, the huge pages behind a mapping, and the peak resident set.

Each probe returns None, NaN or ``"n/a"`` where the file cannot be read (another OS, a container without it), so the
benchmark still runs there with fewer figures.

Examples:
    >>> kernel_thp_mode() in ("always", "madvise", "never", "n/a")
    True
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["anon_huge_kb", "huge_page_share", "kernel_thp_mode", "read_status_kb", "reset_peak_rss", "sched_wait_ns"]

_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def sched_wait_ns() -> int | None:
    """Total run-queue wait (ns) of this process's threads so far, or None where schedstat is unavailable."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread may exit between listdir and open
    return total


def kernel_thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), or ``"n/a"`` without one."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return "n/a"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text and "]" in text else "n/a"


def anon_huge_kb(address: int) -> int | None:
    """AnonHugePages (kB) of the mapping that holds ``address`` (``/proc/self/smaps``), None where unreadable."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def huge_page_share(nbytes: int) -> float:
    """Share (0-1) of a fresh ``nbytes`` CPU tensor that sits on huge pages right after its first write, under this
    process's allocator setting; NaN where ``/proc/self/smaps`` cannot tell. (The mapping holding it is read, so a
    tensor under glibc's mmap threshold, sharing the heap, can read high: meant for logits-sized tensors.)"""
    t = torch.empty(max(1, nbytes // 4))
    t.fill_(0.0)
    nbytes = t.numel() * t.element_size()
    kb = anon_huge_kb(t.data_ptr() + nbytes // 2)
    return math.nan if kb is None else min(1.0, kb * 1024 / nbytes)


def read_status_kb(field: str) -> int:
    """A kB figure of ``/proc/self/status`` (``VmHWM``, ``VmRSS``...).

    Raises:
        RuntimeError: the field is not there.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident set (``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
