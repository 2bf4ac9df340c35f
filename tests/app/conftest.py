"""Fixtures of the benchmark harness's tests (``test_bench_*.py``): one real run at a tiny shape, shared, and a way to
run each allocator setting's measurement in this process so that monkeypatches reach it."""

from __future__ import annotations

import pytest

from monai_gdl_plus.app.bench import children, measure, runner, timing

TINY = (1, 3, 8, 8, 8)
PAIRS = ["ours-dice", "ours-gdl", "ours-dicece", "monai-dice", "monai-gdl", "monai-dicece"]


@pytest.fixture(scope="session")
def tiny_rows():
    """One timing-only run of our losses and MONAI's at a tiny shape (1 round, 1 warm-up) under both allocator
    settings, each in its real child process, started from a process whose own environment has
    ``THP_MEM_ALLOC_ENABLE=1`` (which the ``default`` child must not inherit)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(children.THP_ENV, "1")
        return runner.benchmark([TINY], rounds=1, warmup=1, memory=False, losses=PAIRS)


@pytest.fixture
def in_process(monkeypatch):
    """Each setting's measurement runs in this process instead of a child (so that monkeypatches reach it); the
    list returned records the settings run, in order."""
    ran: list[str] = []

    def run_here(spec, allocator, say):
        ran.append(allocator)
        return measure.measure(spec, allocator, say)

    monkeypatch.setattr(runner, "run_setting", run_here)
    return ran


@pytest.fixture
def fake_floor(monkeypatch):
    """The machine's floors fixed at 10 GB/s and 1 ns per exp (not measured), the per-process cache emptied."""
    monkeypatch.setattr(timing, "measure_floor", lambda device, nbytes: {"bandwidth_gbs": 10.0, "exp_ns": 1.0})
    monkeypatch.setattr(measure, "_FLOOR_CACHE", {})
    return {"bandwidth_gbs": 10.0, "exp_ns": 1.0}
