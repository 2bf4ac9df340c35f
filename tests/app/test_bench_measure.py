"""What a setting's child runs (monai_gdl_plus.app.bench.measure), in this process: rows, floors, failures."""

from __future__ import annotations

import math

import pytest
import torch

from monai_gdl_plus.app import bench
from monai_gdl_plus.app.bench import measure, registry, report

TINY = (1, 3, 8, 8, 8)


def _spec(**kwargs) -> measure.RunSpec:
    base = {"shapes": (TINY,), "losses": ("ours-dice", "monai-dice"), "rounds": 1, "warmup": 0, "threads": 1,
            "device": "cpu", "memory": False, "seed": 0, "compile": False}  # fmt: skip
    return measure.RunSpec(**{**base, **kwargs})


def test_rows_carry_the_floors_of_the_bandwidth_measured(fake_floor):
    """At 10 GB/s and 1 ns per exp: time floor = 2 L / 10 GB/s, exp floor = two exp per logit, for every shape."""
    shapes = (TINY, (2, 4, 6, 6, 6))
    rows = measure.measure(_spec(shapes=shapes), "default", lambda _m: None)
    assert [r["shape"] for r in rows] == ["1x3x8x8x8"] * 2 + ["2x4x6x6x6"] * 2
    for r in rows:
        shape = next(s for s in shapes if "x".join(map(str, s)) == r["shape"])
        logits_bytes = 4 * math.prod(shape)
        assert r["bandwidth_gbs"] == 10.0
        assert r["floor_ms"] == pytest.approx(2 * logits_bytes / 10e9 * 1e3, rel=1e-12)
        assert r["exp_floor_ms"] == pytest.approx(2 * math.prod(shape) * 1e-6, rel=1e-12)
        assert r["logits_mb"] == pytest.approx(logits_bytes / 1e6, rel=1e-12)
    report.add_ratios(rows)
    table = bench.format_table(rows)
    assert f"1x3x8x8x8: L = 0.0 MB; time floor {2 * 4 * math.prod(TINY) / 10e9 * 1e3:.2f} ms" in table


def test_failing_loss_is_reported_and_others_still_measured(monkeypatch, in_process):
    real = registry.make_loss

    class Broken(torch.nn.Module):
        def forward(self, x, y):
            raise RuntimeError("boom")

    def make(key, compiled=False):
        return Broken() if key == "ours-gdl" else real(key)

    monkeypatch.setattr(registry, "make_loss", make)
    rows = bench.benchmark([TINY], rounds=1, warmup=1, memory=False, losses=["ours-gdl", "monai-gdl"],
                           allocators="default")  # fmt: skip
    by_key = {r["loss"]: r for r in rows}
    assert by_key["ours-gdl"]["status"] == "error: RuntimeError: boom"
    assert math.isfinite(by_key["monai-gdl"]["median_ms"])
    assert "GeneralizedDicePlusLoss: error: RuntimeError: boom" in bench.format_table(rows)


def test_spec_travels_to_the_child_as_json():
    spec = _spec(shapes=(TINY, (1, 2, 4, 4)), compile=True)
    assert measure.RunSpec.from_json(spec.to_json()) == spec
