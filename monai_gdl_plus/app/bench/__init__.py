"""Forward+backward time and peak memory of our losses against MONAI's and nnU-Net's, under each allocator setting.

Allocator settings (:data:`ALLOCATORS`): on CPU how fast a loss runs depends on how the process gets fresh memory,
and that is a property of the process, not of a loss. Every setting is therefore applied to every implementation
alike, in its own child process (``python -m monai_gdl_plus.app.bench`` with a private flag, which sends its rows
back as JSON), started with exactly that environment:

- ``default``: ``THP_MEM_ALLOC_ENABLE`` removed from the child's environment, whatever the caller's shell has:
  PyTorch's CPU allocator as shipped. Large tensors come from fresh ``mmap``s mapped 4 KiB at a time on their first
  write (unless the kernel's THP mode is ``always``), so every fresh logits-sized temporary costs page faults.
- ``thp``: ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's own switch: c10's CPU allocator page-aligns every allocation of
  2 MiB or more and ``madvise(MADV_HUGEPAGE)``s it, so the kernel backs it with 2 MiB pages (where its THP mode is
  ``madvise`` or ``always``), far fewer faults. c10 reads the variable once, at the process's first CPU allocation,
  and caches it: it has to be in the environment before the process starts, hence the child processes.

Ratios (``t/MONAI`` etc.) compare implementations within one setting, never across settings. On CUDA the setting
does not concern the measured tensors: only ``default`` runs there.

The method (see ``PERF_NOTES.md``), one concern a module:

- :mod:`~monai_gdl_plus.app.bench.registry`: the implementations compared (:data:`LOSSES`);
- :mod:`~monai_gdl_plus.app.bench.runner`: :func:`benchmark`, one child process per setting;
- :mod:`~monai_gdl_plus.app.bench.children`: the settings' environments and the child processes;
- :mod:`~monai_gdl_plus.app.bench.measure`: what a setting's child runs: every implementation on the same inputs,
  warm-up, round-robin rounds (median), memory, floors;
- :mod:`~monai_gdl_plus.app.bench.timing`: one timed step, repeated while the machine's load disturbed it, and
  the floors: time = reading the logits and writing their gradient once, ``2 L`` bytes at the copy bandwidth
  measured here; memory = ``1.0 L`` (the gradient itself), L = bytes of the logits;
- :mod:`~monai_gdl_plus.app.bench.memory`: peak extra memory of one step (a fresh child per (loss, shape) on CPU);
- :mod:`~monai_gdl_plus.app.bench.probes`: what ``/proc`` and ``/sys`` say (run-queue waits, huge pages, VmHWM);
- :mod:`~monai_gdl_plus.app.bench.traffic`: ``--traffic``, the bytes read and written and the launches of one step,
  counted from the aten ops dispatched (a ``TorchDispatchMode``), and kernel implementations' own counts;
- :mod:`~monai_gdl_plus.app.bench.report`: ratios, the tables, the CSV;
- :mod:`~monai_gdl_plus.app.bench.cli`: ``gdl-plus bench`` and ``python -m monai_gdl_plus.app.bench``.

Use :func:`benchmark` and :func:`format_table` from Python, ``gdl-plus bench`` (through :func:`configure_parser` and
:func:`run`) or ``python -m monai_gdl_plus.app.bench`` from a shell.

Example:
    >>> rows = benchmark([(1, 3, 8, 8, 8)], rounds=1, warmup=0, memory=False, losses=["ours-dice", "monai-dice"])
    >>> print(format_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

from monai_gdl_plus.app.bench.children import ALLOCATORS, THP_ENV
from monai_gdl_plus.app.bench.cli import configure_parser, main, run
from monai_gdl_plus.app.bench.memory import peak_cpu_subprocess
from monai_gdl_plus.app.bench.registry import LOSSES
from monai_gdl_plus.app.bench.report import check_csv_path, format_table, write_csv
from monai_gdl_plus.app.bench.runner import DEVICES, benchmark, parse_shape
from monai_gdl_plus.app.bench.timing import measure_first_touch, measure_floor

__all__ = [
    "ALLOCATORS",
    "DEVICES",
    "LOSSES",
    "THP_ENV",
    "benchmark",
    "check_csv_path",
    "configure_parser",
    "format_table",
    "main",
    "measure_first_touch",
    "measure_floor",
    "parse_shape",
    "run",
    "write_csv",
]

# tests/test_losses.py (the library's) measures a compiled loss's memory through this name; the measurement itself
# is memory.peak_cpu_subprocess
_peak_cpu_subprocess = peak_cpu_subprocess
