"""Timing (monai_gdl_plus.app.bench.timing): the floors the losses are measured against, and the first touch.

No assertion on how long anything takes: the floors are compared with a measurement of the same copy made here,
within a factor that a loaded machine stays inside and a floor computed 10x off does not.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from monai_gdl_plus.app.bench import timing

FLOOR_BYTES = 32 * 2**20  # well past the caches of a CPU, small enough for a shared machine
TOLERANCE = 3.0  # a factor either way: a loaded machine stays inside it, a floor 10x off does not


def _best_seconds(fn, repeats: int = 9) -> float:
    """The fastest of ``repeats`` calls of ``fn``, timed here with the plainest clock loop."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_measure_floor_agrees_with_a_direct_measurement_of_the_copy():
    """bandwidth = (bytes read + bytes written) / time of one copy of FLOOR_BYTES, and exp_ns = time of one exp
    over the elements / their count, as the best of a plain timing loop here gives them. The harness takes a
    median, so it may read slower on a loaded machine: the best of three calls is compared."""
    n = FLOOR_BYTES // 4
    src = torch.empty(n).uniform_(-3.0, 3.0)
    dst = torch.empty_like(src).zero_()
    direct_gbs = 2 * FLOOR_BYTES / _best_seconds(lambda: dst.copy_(src)) / 1e9
    direct_exp_ns = _best_seconds(lambda: torch.exp(src, out=dst)) / n * 1e9
    floors = [timing.measure_floor(nbytes=FLOOR_BYTES, repeats=5) for _ in range(3)]
    bandwidth = max(f["bandwidth_gbs"] for f in floors)
    exp_ns = min(f["exp_ns"] for f in floors)
    assert 1 / TOLERANCE < bandwidth / direct_gbs < TOLERANCE, (bandwidth, direct_gbs)
    assert 1 / TOLERANCE < exp_ns / direct_exp_ns < TOLERANCE, (exp_ns, direct_exp_ns)


def test_measure_first_touch_is_fresh_minus_warm_fill_time(monkeypatch):
    """With the timer replaced, the figure is (fresh fill - warm fill) in ms: the fill that needed a new tensor is
    the fresh one, whatever the order; a warm fill slower than a fresh one gives 0, not a negative time."""
    n = 8 * 2**20
    allocated = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        allocated.append(t)
        return t

    def fake_median(fn, device, repeats):  # fn allocating a new tensor = the fresh fill
        assert (device, repeats) == ("cpu", 3)
        before = len(allocated)
        fn()
        return fresh_s if len(allocated) > before else warm_s

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(timing, "median_time", fake_median)
    fresh_s, warm_s = 0.0075, 0.0025
    assert timing.measure_first_touch(n, repeats=3) == pytest.approx(5.0)
    assert len(allocated) == 2 and all(t.numel() == n // 4 for t in allocated)
    fresh_s, warm_s = 0.001, 0.004
    assert timing.measure_first_touch(n, repeats=3) == 0.0


def test_median_time_is_the_median_after_one_untimed_call(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 27.0])  # samples of 1, 2 and 7 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert timing.median_time(lambda: calls.append(1), "cpu", 3) == 2.0
    assert len(calls) == 4


def test_median_time_on_cuda_is_timed_between_cuda_events(monkeypatch):
    """On CUDA the samples are CUDA events' elapsed times (ms, returned in s), not the host clock (faked: no GPU)."""
    samples = iter([4.0, 1.0, 2.0])

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(samples)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: pytest.fail("host clock used on CUDA"))
    calls = []
    assert timing.median_time(lambda: calls.append(1), "cuda", 3) == pytest.approx(2.0e-3)
    assert len(calls) == 4
