"""Peak extra memory of one forward+backward step, ``x.grad`` included.

On CPU it is measured in a fresh child process per (loss, shape), under the allocator setting of the run and
``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks go back to the OS): the child builds the inputs, runs one warm-up
step, resets the peak RSS (``echo 5 > /proc/self/clear_refs``), runs one step and reports ``VmHWM`` minus the RSS
before that step. (``ru_maxrss`` is useless there: Linux carries the parent's high-water mark across fork+exec.) On
CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step, in process.

Examples:
    >>> row = memory_child("ours-dice", (1, 3, 8, 8, 8), threads=1, seed=0)  # doctest: +SKIP
    >>> row["peak_extra_bytes"] >= 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import gc
import os

import torch

from monai_gdl_plus.app.bench import children, probes, registry, timing

__all__ = ["memory_child", "peak_cpu_subprocess", "peak_cuda"]

_CHILD_TIMEOUT_S = 900  # one memory child; a timing child (a whole setting) has no limit


def peak_cuda(loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes allocated on CUDA during one step above what was allocated before it."""
    x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    timing.step(loss_fn, x, y)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def memory_child(key: str, shape: tuple[int, ...], threads: int, seed: int, compiled: bool = False) -> dict:
    """Runs in the fresh subprocess: peak extra RSS of one forward+backward step (after a warm-up step, which
    also compiles with ``compiled``)."""
    torch.set_num_threads(threads)
    loss_fn = registry.make_loss(key, compiled)
    x, y = timing.make_inputs(shape, "cpu", seed)
    timing.step(loss_fn, x, y)  # warm-up: lazy initialisations stay in the baseline; its big blocks went back to the OS
    x.grad = None
    gc.collect()
    probes.reset_peak_rss()
    base_kb = probes.read_status_kb("VmHWM")
    timing.step(loss_fn, x, y)
    peak_kb = probes.read_status_kb("VmHWM")
    return {
        "loss": key,
        "shape": list(shape),
        "baseline_bytes": base_kb * 1024,
        "peak_extra_bytes": (peak_kb - base_kb) * 1024,
        "logits_bytes": x.numel() * x.element_size(),
        "thp_env": os.environ.get(children.THP_ENV),
    }


def peak_cpu_subprocess(
    key: str, shape: tuple[int, ...], threads: int, seed: int, compiled: bool = False, allocator: str = "default"
) -> int:
    """Peak extra bytes of one step of ``key`` at ``shape``, from a fresh ``--_memory-case`` child under
    ``allocator`` and the malloc setting."""
    argv = [
        "--_memory-case", key, "--shape", ",".join(map(str, shape)), "--threads", str(threads), "--seed", str(seed),
    ] + (["--compile"] if compiled else [])  # fmt: skip
    result = children.run_child(
        argv, allocator, f"memory subprocess for {key} {shape}", extra_env=children.MALLOC_ENV,
        timeout=_CHILD_TIMEOUT_S,
    )  # fmt: skip
    return int(result["peak_extra_bytes"])
