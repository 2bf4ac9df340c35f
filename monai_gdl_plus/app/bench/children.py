"""Child processes and the allocator settings they run under.

How fast a loss runs on CPU depends on how the process gets fresh memory, and PyTorch's CPU allocator reads its
setting (``THP_MEM_ALLOC_ENABLE``) once, at the process's first CPU allocation: so each setting of
:data:`ALLOCATORS` is one child process started with exactly that environment (``python -m
monai_gdl_plus.app.bench`` with a private flag), which prints its result as JSON on the last line of its output.

Examples:
    >>> resolve_allocators(None, "cpu"), resolve_allocators("thp", "cpu"), resolve_allocators(None, "cuda")
    (['default', 'thp'], ['thp'], ['default'])
    >>> THP_ENV in child_env("default"), child_env("thp")[THP_ENV]
    (False, '1')
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence

from monai_gdl_plus.options import check_option

__all__ = ["ALLOCATORS", "ALLOCATOR_ENV", "ALLOCATOR_TEXT", "MALLOC_ENV", "THP_ENV", "child_env", "resolve_allocators",
           "run_child"]  # fmt: skip

ALLOCATORS = ("default", "thp")
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch: huge pages for CPU allocations of 2 MiB or more
# What each allocator setting puts in a child's environment (THP_ENV itself is always removed first).
ALLOCATOR_ENV: dict[str, dict[str, str]] = {"default": {}, "thp": {THP_ENV: "1"}}
ALLOCATOR_TEXT = {
    "default": f"{THP_ENV} unset (PyTorch's CPU allocator as shipped)",
    "thp": f"{THP_ENV}=1 for every implementation (CPU allocations of 2 MiB or more advised onto huge pages)",
}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # memory children: freed blocks go back to the OS
_MODULE = "monai_gdl_plus.app.bench"  # what the children run (its __main__)


def resolve_allocators(allocators: Iterable[str] | None, device: str) -> list[str]:
    """The allocator settings to run, in :data:`ALLOCATORS` order: all of them on CPU by default, ``default`` only on
    CUDA (``THP_MEM_ALLOC_ENABLE`` concerns CPU tensors, not the ones measured there)."""
    if allocators is None:
        return list(ALLOCATORS) if device == "cpu" else ["default"]
    if isinstance(allocators, str):
        allocators = [allocators]
    names: list[str] = []
    for entry in allocators:
        names.extend(check_option("allocators", n.strip(), ALLOCATORS) for n in str(entry).split(",") if n.strip())
    if not names:
        raise ValueError(f"`allocators` must name at least one of {ALLOCATORS}, got {allocators!r}.")
    if device != "cpu" and "thp" in names:
        raise ValueError(
            f"`allocators` 'thp' sets PyTorch's CPU allocator ({THP_ENV}=1) and does not apply to device "
            f"{device!r}; use 'default' there, got {names!r}."
        )
    return [a for a in ALLOCATORS if a in names]


def child_env(allocator: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child under ``allocator``: ``THP_MEM_ALLOC_ENABLE`` exactly as the setting
    says (removed for ``default``, even when this process has it), then ``extra``, and this package importable."""
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    env.update(ALLOCATOR_ENV[allocator])
    env.update(extra or {})
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    return env


def run_child(
    argv: Sequence[str],
    allocator: str,
    what: str,
    *,
    extra_env: dict[str, str] | None = None,
    timeout: float | None = None,
    relay: Callable[[str], None] | None = None,
) -> dict:
    """Run ``python -m monai_gdl_plus.app.bench *argv`` under ``allocator`` and return the JSON object on the last
    line of its standard output. ``relay`` receives its standard error line by line as it comes (progress).

    Raises:
        RuntimeError: the child failed or printed no result (the message names ``what`` and ends with the last line
            of its standard error).
        subprocess.TimeoutExpired: it ran past ``timeout`` seconds (it is killed).
    """
    cmd = [sys.executable, "-m", _MODULE, *argv]
    proc = subprocess.Popen(
        cmd, env=child_env(allocator, extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    err: list[str] = []
    # both pipes drained at once: a child blocked on a full pipe would never exit
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out, None), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err, relay), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        for reader in readers:
            reader.join()
    lines = "".join(out).strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = ([line.strip() for line in err if line.strip()] or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def _drain(stream: Iterable[str], sink: list[str], forward: Callable[[str], None] | None) -> None:
    for line in stream:
        sink.append(line)
        if forward is not None:
            forward(line.rstrip("\n"))
