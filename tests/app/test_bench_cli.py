"""The benchmark's command line (monai_gdl_plus.app.bench.cli): ``gdl-plus bench`` options and exit statuses, the
CSV, and ``python -m monai_gdl_plus.app.bench``."""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys

import pytest

from monai_gdl_plus.app import bench
from monai_gdl_plus.app.bench import memory, registry, runner


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdl-plus bench")
    bench.configure_parser(parser)
    return parser


def test_a_failed_setting_is_reported_and_the_other_kept(in_process, monkeypatch, capsys):
    real = runner.run_setting

    def run(spec, allocator, say):
        if allocator == "thp":
            raise RuntimeError("timing subprocess (thp) failed (exit -9): killed")
        return real(spec, allocator, say)

    monkeypatch.setattr(runner, "run_setting", run)
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--rounds", "1", "--warmup", "0", "--no-memory",
                                 "--losses", "ours-dice,monai-dice"])  # fmt: skip
    assert bench.run(args) == 1
    printed = capsys.readouterr().out
    assert "== allocator thp:" in printed
    assert "DicePlusLoss: error: RuntimeError: timing subprocess (thp) failed (exit -9): killed [1x3x8x8x8]" in printed
    default_block = printed.split("== allocator thp:")[0]
    assert default_block.count("DicePlusLoss  ") == 1 and "MONAI DiceLoss  " in default_block


def test_failed_memory_child_keeps_the_time(monkeypatch, capsys, in_process):
    def fail(key, shape, threads, seed, compiled=False, allocator="default"):
        raise RuntimeError(f"memory subprocess for {key} failed (exit 1): boom")

    monkeypatch.setattr(memory, "peak_cpu_subprocess", fail)
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--rounds", "1", "--warmup", "0", "--losses", "ours-dice",
                                 "--allocator", "default"])  # fmt: skip
    assert bench.run(args) == 1
    printed = capsys.readouterr().out
    row_line = next(line for line in printed.splitlines() if line.startswith("DicePlusLoss  "))
    assert math.isfinite(float(row_line.split()[2]))  # the median time is still there
    assert "DicePlusLoss: memory error: RuntimeError: memory subprocess for ours-dice failed (exit 1): boom" in printed


def test_cli_run_prints_table_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    args = _parser().parse_args(
        ["--shape", "1,3,8,8,8", "--rounds", "1", "--warmup", "0", "--no-memory", "--losses", "ours-dice,monai-dice",
         "--csv", str(out)]
    )  # fmt: skip
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    assert "DicePlusLoss" in printed and "MONAI DiceLoss" in printed and "t/MONAI" in printed
    with open(out, newline="") as f:
        saved = list(csv.DictReader(f))
    assert [(r["allocator"], r["loss"]) for r in saved] == [
        ("default", "ours-dice"), ("default", "monai-dice"), ("thp", "ours-dice"), ("thp", "monai-dice"),
    ]  # fmt: skip
    assert [r["thp_env"] for r in saved] == ["", "", "1", "1"]
    assert all(math.isfinite(float(r["time_vs_monai"])) for r in saved)


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_cli_run_rejects_an_unwritable_csv_before_measuring(tmp_path, capsys, monkeypatch, where):
    target = tmp_path / "nope" / "bench.csv" if where == "missing-folder" else tmp_path
    monkeypatch.setattr(runner, "benchmark", lambda *a, **k: pytest.fail("measured before checking `--csv`"))
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--no-memory", "--csv", str(target)])
    assert bench.run(args) == 2
    err = capsys.readouterr().err
    assert "`--csv`" in err and ("does not exist" in err if where == "missing-folder" else "is a folder" in err)


def test_parser_defaults_and_repeated_shapes():
    args = _parser().parse_args([])
    assert (args.rounds, args.warmup, args.threads, args.device, args.memory) == (7, 2, 2, "cpu", True)
    assert args.shapes is None and args.losses is None and args.csv is None and args.allocators is None
    argv = ["--shape", "1,3,8,8,8", "2x4x6x6x6", "--shape", "1,2,4,4", "--losses", "ours", "monai-gdl",
            "--allocator", "thp", "--allocator", "default,thp"]  # fmt: skip
    args = _parser().parse_args(argv)
    assert args.allocators == ["thp", "default,thp"]
    assert args.shapes == [(1, 3, 8, 8, 8), (2, 4, 6, 6, 6), (1, 2, 4, 4)]
    assert registry.resolve_losses(args.losses) == [
        "ours-dice", "ours-gdl", "ours-dicece", "ours-dicefocal", "ours-tversky", "ours-masked-dice",
        "ours-wasserstein", "monai-gdl",
    ]  # fmt: skip


@pytest.mark.parametrize("text", ["2,4", "2,1,8,8,8", "2,a,8,8", "0,3,8,8"])
def test_bad_shape_is_a_usage_error_naming_the_option(text, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--shape", text])
    assert "--shape" in capsys.readouterr().err


def test_cli_bad_value_is_one_line_error(capsys):
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--rounds", "0"])
    assert bench.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gdl-plus bench: error: `rounds` must be >= 1, got 0."


def test_python_dash_m_runs_the_benchmark():
    """``python -m monai_gdl_plus.app.bench`` (the package's __main__, which the children run too)."""
    cmd = [sys.executable, "-m", "monai_gdl_plus.app.bench", "--shape", "1,3,8,8,8", "--rounds", "1", "--warmup",
           "0", "--no-memory", "--losses", "ours-dice", "--allocator", "default"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("== allocator default:") and "DicePlusLoss  1x3x8x8x8" in proc.stdout
