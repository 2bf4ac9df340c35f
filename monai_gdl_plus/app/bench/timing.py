"""Timing: one forward+backward step, repeated while the machine's load disturbed it, and the floors it is measured
against (copy bandwidth, ``exp`` throughput, the first touch of fresh memory).

A step is ``loss(x, y).backward()`` timed after ``x.grad = None``: it includes allocating ``x.grad``, not freeing the
previous step's. On Linux a sample during which any of the process's threads waited for a CPU (run-queue delay in
``/proc/self/task/*/schedstat``) is repeated, up to :data:`MAX_RETRIES` times, keeping the least-disturbed sample.
On CUDA times come from CUDA events.

Examples:
    >>> floor = measure_floor(nbytes=2**20, repeats=1)
    >>> sorted(floor), floor["bandwidth_gbs"] > 0
    (['bandwidth_gbs', 'exp_ns'], True)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from monai_gdl_plus.app.bench import probes

__all__ = ["MAX_RETRIES", "make_inputs", "measure_first_touch", "measure_floor", "median_time", "step", "time_step"]

MAX_RETRIES = 5
# A sample counts as disturbed when its threads waited this long for a CPU (absolute ns, or fraction of the sample).
_WAIT_ABS_NS = 200_000
_WAIT_FRACTION = 0.02


def make_inputs(shape: tuple[int, ...], device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits ``shape`` with ``requires_grad`` and an int64 label map (B, 1, *spatial), seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g).to(device)
    return x, y


def step(loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward+backward step of ``loss_fn`` on fresh gradients."""
    x.grad = None
    loss_fn(x, y).backward()


def time_step(
    loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, max_retries: int = MAX_RETRIES
) -> tuple[float, int, float]:
    """One timed step: (milliseconds, repeats caused by CPU contention (at most ``max_retries``), wait fraction).

    The wait fraction is the kept sample's run-queue wait summed over this process's threads, divided by its
    duration (NaN where schedstat is unavailable, and on CUDA).
    """
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x.grad = None
        torch.cuda.synchronize()
        start.record()
        step(loss_fn, x, y)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)), 0, math.nan
    best_wait, best_ms = math.inf, math.nan
    for attempt in range(max_retries + 1):
        x.grad = None  # freed before the clock starts (``step`` then finds nothing to free)
        w0 = probes.sched_wait_ns()
        t0 = time.perf_counter_ns()
        step(loss_fn, x, y)
        t1 = time.perf_counter_ns()
        w1 = probes.sched_wait_ns()
        ms = (t1 - t0) / 1e6
        if w0 is None or w1 is None:
            return ms, 0, math.nan
        wait = w1 - w0
        if wait < best_wait:
            best_wait, best_ms = wait, ms
        if wait <= max(_WAIT_ABS_NS, _WAIT_FRACTION * (t1 - t0)):
            return ms, attempt, wait / max(1, t1 - t0)
    return best_ms, max_retries, best_wait / max(1.0, best_ms * 1e6)


def median_time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` after one untimed call (on CUDA between CUDA events: no host overhead counted)."""
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
            continue
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_floor(device: str = "cpu", nbytes: int = 256 * 2**20, repeats: int = 7) -> dict[str, float]:
    """Measure copy bandwidth (and, on CPU, ``exp`` throughput) with one large float32 tensor.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        nbytes: size of the source tensor (the destination has the same size, preallocated and touched).
        repeats: timed repetitions; the median is used.

    Returns:
        ``{"bandwidth_gbs": bytes read + written per second / 1e9, "exp_ns": nanoseconds per exp element}``.
    """
    n = max(1, nbytes // 4)
    src = torch.empty(n, device=device).uniform_(-3.0, 3.0)
    dst = torch.empty_like(src).zero_()
    t_copy = median_time(lambda: dst.copy_(src), device, repeats)
    t_exp = median_time(lambda: torch.exp(src, out=dst), device, repeats)
    return {"bandwidth_gbs": 2 * n * 4 / t_copy / 1e9, "exp_ns": t_exp / n * 1e9}


def measure_first_touch(nbytes: int, repeats: int = 5) -> float:
    """Milliseconds the CPU spends making ``nbytes`` of freshly allocated memory usable (page faults and zeroing,
    as the first write to a new tensor pays them): filling a new tensor minus filling a touched one, medians.

    Every implementation pays this at least once per step, for the gradient; on virtual machines it can exceed
    the arithmetic of a whole loss, and it varies with the host's memory state, so it is measured next to the
    losses, per shape. It is measured under this process's own allocator setting: in a ``thp`` child of
    :func:`~monai_gdl_plus.app.bench.benchmark` (``THP_MEM_ALLOC_ENABLE=1``) the new tensor is on huge pages where
    the kernel allows.
    """
    n = max(1, nbytes // 4)
    warm = torch.empty(n)
    t_warm = median_time(lambda: warm.fill_(0.0), "cpu", repeats)
    t_fresh = median_time(lambda: torch.empty(n).fill_(0.0), "cpu", repeats)
    return max(0.0, t_fresh - t_warm) * 1e3
