"""Huge-page advice for the fused loss's buffer (monai_gdl_plus.app.memory)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from monai_gdl_plus.app import memory

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The kernel's THP mode (the bracketed word), or None without THP."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def _vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (``/proc/self/smaps``)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("madvise", "always"),
                    reason="needs Linux with transparent huge pages in madvise or always mode")
def test_advised_memory_is_backed_by_huge_pages():
    """After the advice, the first write maps 2 MiB pages (or tries to: the kernel may fall back when it has
    none free, which /proc/vmstat counts)."""
    t = torch.empty(48 * 2**20 // 4)  # over glibc's largest mmap threshold (32 MiB): fresh, untouched pages
    fallback = _vmstat("thp_fault_fallback")
    assert memory.advise_huge_pages(t)
    t.fill_(1.0)
    assert _anon_huge_kb(t.data_ptr() + 24 * 2**20) > 0 or _vmstat("thp_fault_fallback") > fallback


def test_no_advice_where_it_cannot_apply(monkeypatch):
    assert not memory.advise_huge_pages(torch.empty(1000))  # no aligned 2 MiB inside
    assert not memory.advise_huge_pages(torch.empty(2**22, device="meta"))
    assert not memory.advise_huge_pages(torch.empty(0))
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv(memory.HUGE_PAGES_ENV, off)
        assert not memory.huge_pages_enabled()
        assert not memory.advise_huge_pages(torch.empty(2**22))
    monkeypatch.setenv(memory.HUGE_PAGES_ENV, "1")
    monkeypatch.setattr(memory, "_madvise", lambda: None)  # e.g. not Linux
    assert not memory.huge_pages_enabled()
    assert not memory.advise_huge_pages(torch.empty(2**22))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise through libc on Linux only")
def test_advice_covers_only_the_aligned_interior(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_madvise", lambda: lambda start, length, advice: calls.append((start, length)) or 0)
    t = torch.empty(5 * 2**20 // 4)
    assert memory.advise_huge_pages(t[1:])  # a view advises its whole storage
    (start, length), = calls
    base, nbytes = t.untyped_storage().data_ptr(), 5 * 2**20
    assert start % 2**21 == 0 and length % 2**21 == 0 and length > 0
    assert base <= start and start + length <= base + nbytes and start - base < 2**21
    assert base + nbytes - (start + length) < 2**21
