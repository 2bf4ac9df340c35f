"""What ``/proc`` and ``/sys`` tell (monai_gdl_plus.app.bench.probes): huge pages behind a fresh tensor under each
allocator setting, run-queue waits, the peak resident set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_gdl_plus.app.bench import children, probes

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
LINUX = sys.platform.startswith("linux")


def _thp_mode() -> str | None:
    """The kernel's THP mode (the bracketed word), or None without THP."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def test_kernel_thp_mode_reads_the_bracketed_word():
    assert probes.kernel_thp_mode() == (_thp_mode() or "n/a")


@pytest.mark.skipif(not LINUX or _thp_mode() not in ("madvise", "always"),
                    reason="needs Linux with transparent huge pages in madvise or always mode")  # fmt: skip
def test_thp_child_backs_a_large_fresh_tensor_with_huge_pages(monkeypatch):
    """In a child started with the thp setting's environment, the first write to a fresh 48 MiB tensor maps huge
    pages (or tries to: the kernel may fall back when it has none free, which /proc/vmstat counts); in the default
    child, on a kernel in madvise mode, none. This process has THP_MEM_ALLOC_ENABLE=1, which must not leak."""
    code = (
        "import json, torch\n"
        "from monai_gdl_plus.app.bench import probes\n"
        "def fallback():\n"
        "    return sum(int(v) for k, v in (l.split() for l in open('/proc/vmstat')) if k == 'thp_fault_fallback')\n"
        "before = fallback()\n"
        "t = torch.empty(48 * 2**20 // 4)\n"
        "t.fill_(1.0)\n"
        "print(json.dumps({'huge_kb': probes.anon_huge_kb(t.data_ptr() + 24 * 2**20), 'fallbacks': fallback() - before,"
        " 'share': probes.huge_page_share(48 * 2**20)}))\n"
    )
    monkeypatch.setenv(children.THP_ENV, "1")
    seen = {}
    for allocator in ("default", "thp"):
        proc = subprocess.run([sys.executable, "-c", code], env=children.child_env(allocator), capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[allocator] = json.loads(proc.stdout.splitlines()[-1])
    assert seen["thp"]["huge_kb"] > 0 or seen["thp"]["fallbacks"] > 0, seen
    if seen["thp"]["fallbacks"] == 0:
        assert seen["thp"]["share"] > 0.5, seen
    if _thp_mode() == "madvise":
        assert seen["default"]["huge_kb"] == 0 and seen["default"]["share"] == 0.0, seen


@pytest.mark.skipif(not LINUX, reason="reads /proc/self")
def test_sched_wait_grows_while_threads_wait():
    """The run-queue wait of this process's threads: an int that never decreases."""
    first = probes.sched_wait_ns()
    torch.randn(2**20).exp_()
    assert isinstance(first, int) and probes.sched_wait_ns() >= first


@pytest.mark.skipif(not LINUX, reason="reads /proc/self")
def test_peak_rss_reset_and_read():
    """After the reset VmHWM is the current RSS; touching 64 MiB more raises it by about that much."""
    probes.reset_peak_rss()
    base = probes.read_status_kb("VmHWM")
    assert base <= probes.read_status_kb("VmRSS") + 1024
    block = torch.ones(64 * 2**20 // 4)
    assert probes.read_status_kb("VmHWM") - base >= 0.9 * block.numel() * 4 / 1024
    with pytest.raises(RuntimeError, match="NoSuchField not found in /proc/self/status"):
        probes.read_status_kb("NoSuchField")
