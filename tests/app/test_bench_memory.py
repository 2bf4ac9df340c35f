"""Peak extra memory (monai_gdl_plus.app.bench.memory): the memory children of a setting's run, a real child's
figure, and the CUDA peak with a fake device."""

from __future__ import annotations

import math

import pytest
import torch

from monai_gdl_plus.app import bench
from monai_gdl_plus.app.bench import children, measure, memory, timing

TINY = (1, 3, 8, 8, 8)


def test_memory_children_run_under_the_setting_of_their_run(monkeypatch):
    """The memory children of a setting's run get that setting and the malloc setting."""
    calls = []

    def fake_child(argv, allocator, what, **kwargs):
        calls.append((argv[1], allocator, kwargs.get("extra_env")))
        return {"peak_extra_bytes": 4096}

    monkeypatch.setattr(children, "run_child", fake_child)
    spec = measure.RunSpec(shapes=(TINY,), losses=("ours-dice", "monai-dice"), rounds=1, warmup=0, threads=1,
                           device="cpu", memory=True, seed=0, compile=False)  # fmt: skip
    for allocator in ("thp", "default"):
        calls.clear()
        rows = measure.measure(spec, allocator, lambda _m: None)
        assert calls == [(k, allocator, children.MALLOC_ENV) for k in ("ours-dice", "monai-dice")]
        assert all(r["peak_mb"] == 4096 / measure.MB and r["allocator"] == allocator for r in rows)


@pytest.mark.slow
def test_memory_subprocess_reports_peak_including_the_gradient():
    shape = (1, 4, 64, 64, 64)  # logits of 4 MB: well above malloc's mmap threshold and RSS counter granularity
    rows = bench.benchmark([shape], rounds=1, warmup=0, memory=True, losses=["ours-dice", "monai-dice"])
    assert [r["allocator"] for r in rows] == ["default", "default", "thp", "thp"]
    for r in rows:
        assert (r["status"], r["memory_status"]) == ("ok", "ok"), r
        assert math.isfinite(r["peak_mb"]) and r["peak_mb"] > 0
        assert r["peak_L"] == pytest.approx(r["peak_mb"] * measure.MB / (math.prod(shape) * 4))
        assert r["peak_L"] > 0.5  # x.grad alone is 1.0 L
        assert math.isfinite(r["mem_vs_monai"])
    assert rows[1]["mem_vs_monai"] == pytest.approx(1.0) and rows[3]["mem_vs_monai"] == pytest.approx(1.0)


class FakeCuda:
    """Stands in for ``torch.cuda`` in the harness's CUDA helpers: a clock that only the loss advances, and an
    allocator whose peak the loss raises."""

    def __init__(self, step_ms: float, step_bytes: int, base_bytes: int) -> None:
        self.clock_ms, self.step_ms, self.step_bytes = 0.0, step_ms, step_bytes
        self.allocated = self.peak = base_bytes
        self.synced = 0
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                self.t = None

            def record(self) -> None:
                self.t = fake.clock_ms

            def synchronize(self) -> None:
                fake.synced += 1

            def elapsed_time(self, end) -> float:
                return end.t - self.t

        self.Event = Event

    def synchronize(self) -> None:
        self.synced += 1

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated

    def loss(self, x, y):
        """A loss step on the fake device: takes ``step_ms`` and peaks ``step_bytes`` above what was allocated."""
        self.clock_ms += self.step_ms
        self.peak = max(self.peak, self.allocated + self.step_bytes)
        return (x * 0).sum()


def test_cuda_timing_and_peak_helpers_with_a_fake_device(monkeypatch):
    """What ``device="cuda"`` rows are made of, on CPU: the event time of exactly one step (no retries, no wait
    figure) and the peak allocated above the memory in use before the step."""
    fake = FakeCuda(step_ms=12.5, step_bytes=3 * 2**20, base_bytes=5 * 2**20)
    for name in ("Event", "synchronize", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    x, y = timing.make_inputs(TINY, "cpu", 0)
    ms, retried, wait = timing.time_step(fake.loss, x, y, "cuda")
    assert (ms, retried) == (12.5, 0) and math.isnan(wait)
    assert fake.synced >= 2  # before the start event and on the end event
    fake.peak = 10 * 2**30  # a high-water mark left by an earlier step must not count
    assert memory.peak_cuda(fake.loss, x, y) == 3 * 2**20
