"""The report (monai_gdl_plus.app.bench.report): ratios within one setting, the table, and the issue's targets
checked by benchmarks/bench_losses.py from the same rows."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from monai_gdl_plus.app import bench
from monai_gdl_plus.app.bench import registry, report


def test_ratios_compare_rows_of_the_same_setting_only():
    """Synthetic rows where MONAI is 5x faster under thp: each setting's ratio uses its own MONAI and nnU-Net rows."""
    rows = []
    for allocator, ours, monai, nnunet in (("default", 30.0, 100.0, 60.0), ("thp", 10.0, 20.0, 40.0)):
        for key, ms in (("ours-dice", ours), ("monai-dice", monai), ("nnunet-memeff", nnunet)):
            rows.append({"loss": key, "allocator": allocator, "shape": "1x3x8x8x8", "median_ms": ms,
                         "peak_mb": ms / 10, "logits_mb": 1.0, "floor_ms": 1.0})  # fmt: skip
    report.add_ratios(rows)
    by_key = {(r["allocator"], r["loss"]): r for r in rows}
    assert by_key[("default", "ours-dice")]["time_vs_monai"] == pytest.approx(0.3)
    assert by_key[("thp", "ours-dice")]["time_vs_monai"] == pytest.approx(0.5)
    assert by_key[("thp", "ours-dice")]["mem_vs_nnunet"] == pytest.approx(0.25)
    assert by_key[("default", "nnunet-memeff")]["time_vs_monai"] == pytest.approx(0.6)
    assert by_key[("thp", "monai-dice")]["time_vs_nnunet"] == pytest.approx(0.5)
    assert by_key[("thp", "ours-dice")]["peak_L"] == pytest.approx(1.0)


def test_table_prints_every_row_ratio_and_floor(tiny_rows):
    table = bench.format_table(tiny_rows)
    default_block, thp_block = table.split("\n== allocator thp: ")
    assert default_block.startswith("== allocator default: THP_MEM_ALLOC_ENABLE unset")
    for block, allocator in ((default_block, "default"), (thp_block, "thp")):
        lines = block.splitlines()
        header = [h.strip() for h in lines[1].split("  ") if h.strip()]
        for col in ("ms", "retried", "wait%", "peak MB", "xL", "t/MONAI", "m/MONAI", "t/nnU-Net", "m/nnU-Net",
                    "t/floor"):  # fmt: skip
            assert col in header
        for r in (r for r in tiny_rows if r["allocator"] == allocator):
            row_line = next(line for line in lines if line.startswith(r["label"] + "  "))
            assert r["shape"] in row_line
            assert f"{r['time_vs_monai']:.2f}" in row_line.split(r["shape"])[1]
            assert f"{r['median_ms']:.1f}" in row_line.split(r["shape"])[1]
        assert "time floor" in block and "memory floor" in block
        assert "first touch of L fresh bytes" in block and "on huge pages" in block
    notes = thp_block.replace("\n", " ")  # the notes come last, wrapped
    assert "GB/s" in notes and "default = THP_MEM_ALLOC_ENABLE unset in that child" in notes
    assert "thp = THP_MEM_ALLOC_ENABLE=1 in that child" in notes and "Compare rows within a block" in notes
    assert all(math.isfinite(r["first_touch_ms"]) and r["first_touch_ms"] >= 0 for r in tiny_rows)


def _rows_for_targets(ours_ms: float, ours_mb: float) -> list[dict]:
    """Synthetic rows at the issue shapes: MONAI 100 ms / 300 MB, nnU-Net 80 ms / 300 MB, ours as given."""
    rows = []
    for shape in ("2x16x64x64x64", "1x105x64x64x64"):
        for key in registry.LOSSES:
            owner = key.split("-")[0]
            ms, mb = {"ours": (ours_ms, ours_mb), "monai": (100.0, 300.0), "nnunet": (80.0, 300.0)}[owner]
            rows.append({"loss": key, "label": key, "shape": shape, "status": "ok", "median_ms": ms, "peak_mb": mb})
    return rows


def test_issue_targets_are_checked():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    lines = script.check_targets(_rows_for_targets(ours_ms=25.0, ours_mb=90.0))
    assert len(lines) == 2 * 5 + 5  # five time targets at two shapes, five memory targets at one
    assert all(line.endswith(": met") for line in lines)
    assert any("ours-dice / monai-dice = 0.25x (target <= 0.30x): met" in line for line in lines)

    lines = script.check_targets(_rows_for_targets(ours_ms=35.0, ours_mb=120.0))
    missed = [line for line in lines if line.endswith("MISSED")]
    assert len(missed) == 2 * 2 + 3  # Dice and GDL time at both shapes (0.35x > 0.30x); memory 0.40x > 0.35x
    assert sum(line.endswith(": met") for line in lines) == len(lines) - len(missed)

    rows = [r for r in _rows_for_targets(25.0, 90.0) if r["loss"] != "nnunet-memeff"]
    rows.append({"loss": "nnunet-memeff", "label": "nnU", "shape": "1x105x64x64x64", "status": "not installed",
                 "median_ms": math.nan, "peak_mb": math.nan})  # fmt: skip
    lines = script.check_targets(rows)
    assert sum("not measured (not installed)" in line for line in lines) == 4  # time x2, memory x2 at 1x105

    # two allocator settings: each target is checked within each setting, against that setting's MONAI/nnU-Net
    rows = [dict(r, allocator="default") for r in _rows_for_targets(ours_ms=25.0, ours_mb=90.0)]
    rows += [dict(r, allocator="thp") for r in _rows_for_targets(ours_ms=35.0, ours_mb=90.0)]
    lines = script.check_targets(rows)
    assert len(lines) == 2 * (2 * 5 + 5)
    assert [line for line in lines if line.endswith("MISSED")] == [
        line for line in lines if " thp " in line and line.startswith("time") and "monai" in line.split("=")[0]
        and "dicece" not in line.split("=")[0]
    ]  # fmt: skip
    assert len([line for line in lines if line.endswith("MISSED")]) == 4  # Dice and GDL vs MONAI at two shapes
