"""benchmarks/gpu_kernels.py, the device check of the Triton kernels, without a GPU: its floor, time guard, table,
outputs and arguments; its parity check run on CPU tensors through Triton's interpreter (a wrong reference fails
it); and that without CUDA it says so and exits 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def gk():
    spec = importlib.util.spec_from_file_location("gpu_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_kernels"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_kernels"]


def test_floor_is_three_logits_at_the_copy_bandwidth(gk):
    logits = 2 * 16 * 128**3 * 4  # (2, 16, 128^3) float32: 268 MB
    assert gk.floor_ms(logits, 4300.0) == pytest.approx(3 * logits / 4300e9 * 1e3)  # ~0.187 ms
    assert gk.floor_ms(logits, 4300.0, multiple=1.0) == pytest.approx(gk.floor_ms(logits, 4300.0) / 3)
    assert math.isnan(gk.floor_ms(logits, 0.0))


def test_time_guard_skips_once_spent_and_says_so_once(gk, capsys):
    now = [100.0]
    guard = gk.TimeGuard("timing", 10.0, clock=lambda: now[0])
    assert guard.allows("a") and not guard.expired()
    now[0] = 109.9
    assert guard.allows("b")
    now[0] = 110.0
    assert not guard.allows("c") and not guard.allows("d")
    assert guard.skipped == ["c", "d"]
    out = capsys.readouterr().out
    assert out.count("[skip] timing: its 10 s are spent") == 1


def _rows(gk):
    rows = []
    for path, key, ms, peak in (("monai", "monai-dice", 2.0, 3.0), ("triton", "ours-dice", 0.4, 1.05),
                                ("torch", "ours-dice", 3.0, 1.4)):  # fmt: skip
        rows.append({"shape": "2x16x128x128x128", "dtype": "float32", "family": "dice", "loss": key, "path": path,
                     "label": f"{key} [{path}]", "median_ms": ms, "floor_ms": 0.2, "time_vs_floor": ms / 0.2,
                     "traffic_L": 3.32 if path == "triton" else math.nan, "peak_L": peak, "status": "ok"})  # fmt: skip
    rows.append(dict(rows[1], dtype="float16", median_ms=math.nan, peak_L=math.nan, status="error: boom"))
    gk.add_ratios(rows)
    return rows


def test_ratios_are_against_the_same_familys_monai_row(gk):
    rows = _rows(gk)
    assert [r["time_vs_monai"] for r in rows[:3]] == [1.0, 0.2, 1.5]
    assert math.isnan(rows[3]["time_vs_monai"])  # no float16 MONAI row, no time


def test_table_and_targets(gk):
    rows = _rows(gk)
    table = gk.format_table(rows, 4300.0)
    lines = table.splitlines()
    assert lines[0].split() == ["shape", "dtype", "loss", "ms", "t/MONAI", "floor", "ms", "t/floor", "traffic/L",
                                "peak/L"]  # fmt: skip
    assert set(lines[1]) == {"-"}
    triton = next(line for line in lines if "ours-dice [triton]" in line and "float32" in line)
    assert triton.split()[4:] == ["0.400", "0.20", "0.200", "2.0", "3.32", "1.05"]
    assert "measured copy bandwidth 4300 GB/s" in table
    assert "ours-dice [triton] 2x16x128x128x128 float16: error: boom" in table
    targets = gk.target_lines(rows)
    assert len(targets) == 6  # three targets for each Triton row
    assert [t.rsplit(": ", 1)[1] for t in targets[:3]] == ["met", "met", "met"]  # 0.2x, 2.0x, 1.05 L
    assert targets[3].endswith("time_vs_monai = - (<= 0.25): not measured")
    slow = [dict(r, time_vs_monai=0.3, peak_L=1.2) for r in rows[1:2]]
    assert [t.rsplit(": ", 1)[1] for t in gk.target_lines(slow)] == ["MISSED", "met", "MISSED"]


def test_outputs_are_written(gk, tmp_path):
    rows = _rows(gk)
    paths = gk.write_outputs(tmp_path / "out", {"device": "none", "timing": rows, "parity": []})
    assert [p.name for p in paths] == ["kernels_timing.csv", "gpu_kernels.json"]
    with open(paths[0]) as f:
        back = list(csv.DictReader(f))
    assert len(back) == 4 and back[1]["label"] == "ours-dice [triton]" and float(back[1]["median_ms"]) == 0.4
    report = json.loads(paths[1].read_text())
    assert report["timing"][0]["loss"] == "monai-dice" and report["device"] == "none"


def test_arguments(gk):
    args = gk.parse_args([])
    assert (args.quick, args.budget, args.out) == (False, 210.0, Path("gpu_kernels_out"))
    args = gk.parse_args(["--quick", "--out", "x"])
    assert (args.quick, args.budget, args.out) == (True, 100.0, Path("x"))
    assert gk.parse_args(["--budget", "42"]).budget == 42.0
    with pytest.raises(SystemExit):
        gk.parse_args(["--budget", "0"])


def test_relative_error_and_grad_tolerance(gk):
    ref = torch.tensor([1.0, -4.0])
    assert gk.relative_error(torch.tensor([1.5, -4.0]), ref) == 0.5 / 4  # of the largest magnitude, not per element
    assert gk.relative_error(torch.tensor([float("nan"), 0.0]), ref) == math.inf
    assert gk.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert gk.grad_tolerance(torch.float32) == 1e-5
    assert gk.grad_tolerance(torch.float16) == torch.finfo(torch.float16).eps


def _interpreting() -> bool:
    triton = pytest.importorskip("triton")
    return type(triton.language.zeros).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("c", [4, 133])
def test_parity_check_passes_and_fails_on_cpu_through_the_interpreter(gk, c, single_thread):
    if not _interpreting():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 (see conftest.py)")
    import monai.losses as ML

    from monai_gdl_plus import DiceCEPlusLoss

    cpu, spatial = torch.device("cpu"), (2, 5, 4, 3)
    cases = {name: (ours, ref, ig) for name, ours, ref, ig in gk.parity_cases(c)}
    ok = gk.parity_one("DiceCE softmax class weights", *cases["DiceCE softmax class weights"], c, cpu, False, spatial)
    assert ok.ok and ok.versus == ["torch", "MONAI"], ok.line()
    ok = gk.parity_one("GDL softmax ignore=255", *cases["GDL softmax ignore=255"], c, cpu, False, spatial)
    assert ok.ok and ok.versus == ["torch"], ok.line()
    # a reference that differs (MONAI without the class weights) must fail the check
    w = torch.linspace(0.5, 2.0, c)
    ours, unweighted = (lambda: DiceCEPlusLoss(to_onehot_y=True, softmax=True, weight=w),
                        lambda: ML.DiceCELoss(to_onehot_y=True, softmax=True))  # fmt: skip
    bad = gk.parity_one("wrong", ours, unweighted, None, c, cpu, False, spatial)
    assert not bad.ok and bad.line().startswith("[FAIL]")


def test_without_cuda_it_says_so_and_exits_2(gk, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gk.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_script_runs_without_cuda():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device (torch.cuda.is_available() is False)" in proc.stdout


def test_gpu_check_runs_the_kernel_checks_with_kernels(gk, monkeypatch):
    """``gpu_check.py --kernels --quick`` calls gpu_kernels.main with its options and what is left of the budget
    (CUDA and gpu_check's own checks stubbed); without ``--kernels`` it does not."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stub")
    for name in ("check_sync_free", "check_parity", "check_amp", "check_metric_sync_free"):
        monkeypatch.setattr(gpu_check, name, lambda: True)
    monkeypatch.setattr(gk, "main", lambda argv: calls.append(argv) or 1)
    assert gpu_check.main([]) == 0 and calls == []
    assert gpu_check.main(["--kernels", "--quick"]) == 1  # a failed kernel check fails the command
    (argv,) = calls
    assert argv[:2] == ["--quick", "--budget"] and 60 <= float(argv[2]) <= gpu_check.KERNELS_WITHIN_S


def test_timing_rows_at_a_tiny_shape_on_cpu(gk, monkeypatch, single_thread):
    """The timing part end to end on CPU tensors (Triton's interpreter; no memory column off CUDA): every
    implementation at both dtypes, ratios against the same family's MONAI row, the kernels' own traffic count."""
    if not _interpreting():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 (see conftest.py)")
    from monai_gdl_plus.functional import kernel_traffic

    monkeypatch.setattr(gk, "WARMUP", 1)
    rows = gk.timing_rows(gk.TimeGuard("timing", math.inf), [(1, 4, 5, 4, 3)], 1, 10.0, device="cpu")
    assert [(r["dtype"], r["loss"], r["path"]) for r in rows[:3]] == [
        ("float32", "monai-dice", "monai"), ("float32", "ours-dice", "triton"), ("float32", "ours-dice", "torch")]
    assert len(rows) == 2 * 9 and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert all(r["time_vs_monai"] == 1.0 for r in rows if r["path"] == "monai")
    dicece = next(r for r in rows if r["loss"] == "ours-dicece" and r["path"] == "triton" and r["dtype"] == "float16")
    assert dicece["traffic_L"] == kernel_traffic(1, 4, 60, torch.float16, with_ce=True).total_l
    assert dicece["logits_bytes"] == 4 * 60 * 2 and dicece["floor_ms"] == gk.floor_ms(480, 10.0)
    assert all(math.isnan(r["traffic_L"]) for r in rows if r["path"] != "triton")


def test_parity_under_autocast_on_cpu(gk, single_thread):
    """float16 logits under autocast: Triton vs the torch path, and vs MONAI in float32 on the rounded logits."""
    if not _interpreting():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 (see conftest.py)")
    cases = {name: (ours, ref, ig) for name, ours, ref, ig in gk.parity_cases(4)}
    r = gk.parity_one("Dice sigmoid squared", *cases["Dice sigmoid squared"], 4, torch.device("cpu"), True,
                      (2, 5, 4, 3))  # fmt: skip
    assert r.ok and r.versus == ["torch", "MONAI fp32"] and r.grad_tol == torch.finfo(torch.float16).eps, r.line()


def test_training_steps_run_gpu_checks_step_on_the_triton_path(gk, monkeypatch, capsys):
    """check_training calls gpu_check._sync_free_step (stubbed: no CUDA here) with MONAI_GDL_PLUS_KERNELS=triton,
    eager and compiled, float32 and AMP; a step that raises (a host sync) is a FAIL; a spent budget skips."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    seen = []

    def step(fn, shape, ignore, amp):
        seen.append((os.environ.get(gk.KERNELS_ENV), type(fn).__name__, shape[1], ignore, amp))
        if len(seen) == 2:
            raise RuntimeError("called a synchronizing CUDA operation\nmore")
        return "loss=0.5"

    monkeypatch.setattr(gpu_check, "_sync_free_step", step)
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph: torch.nn.Sequential(fn))  # a visible wrapper
    results = gk.check_training(gk.TimeGuard("train", math.inf), quick=True)
    assert {s[0] for s in seen} == {"triton"}
    assert len(results) == 3 * 2 + 2  # three losses x {fp32, AMP} eager at C=16, one compiled x {fp32, AMP}
    assert [s[1] for s in seen].count("Sequential") == 2 and {s[4] for s in seen} == {False, True}
    assert [r["ok"] for r in results].count(False) == 1 and "synchronizing" in results[1]["message"]
    out = capsys.readouterr().out
    assert "[FAIL]   sync-free step (triton): DiceCE softmax ignore=255 C=16 [amp fp16]: error: RuntimeError" in out
    now = [0.0]
    spent = gk.TimeGuard("train", 1.0, clock=lambda: now[0])
    now[0] = 2.0
    assert gk.check_training(spent, quick=True) == [] and len(spent.skipped) == 8


def test_kernels_switch_is_restored(gk, monkeypatch):
    monkeypatch.delenv(gk.KERNELS_ENV, raising=False)
    with gk.kernels("triton"):
        assert os.environ[gk.KERNELS_ENV] == "triton"
    assert gk.KERNELS_ENV not in os.environ
    monkeypatch.setenv(gk.KERNELS_ENV, "auto")
    with pytest.raises(KeyError), gk.kernels("torch"):
        raise KeyError
    assert os.environ[gk.KERNELS_ENV] == "auto"
