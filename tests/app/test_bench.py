"""The benchmark harness: rows, ratios, table, allocator-setting and memory subprocesses and CLI entry points, on
tiny shapes.

No wall-clock assertion anywhere: only that figures exist, are finite and are combined consistently, and that each
child process gets exactly the environment of its allocator setting.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_gdl_plus import _ops
from monai_gdl_plus.app import bench

TINY = (1, 3, 8, 8, 8)
PAIRS = ["ours-dice", "ours-gdl", "ours-dicece", "monai-dice", "monai-gdl", "monai-dicece"]
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture(scope="module")
def tiny_rows():
    """One timing-only run of our losses and MONAI's at a tiny shape (1 round, 1 warm-up) under both allocator
    settings, each in its real child process, started from a process whose own environment has
    ``THP_MEM_ALLOC_ENABLE=1`` (which the ``default`` child must not inherit)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bench.THP_ENV, "1")
        return bench.benchmark([TINY], rounds=1, warmup=1, memory=False, losses=PAIRS)


@pytest.fixture
def in_process(monkeypatch):
    """Each setting's measurement runs in this process instead of a child (so that monkeypatches reach it); the
    list returned records the settings run, in order."""
    ran: list[str] = []

    def run_here(spec, allocator, say):
        ran.append(allocator)
        return bench._measure(spec, allocator, say)

    monkeypatch.setattr(bench, "_run_setting", run_here)
    return ran


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdl-plus bench")
    bench.configure_parser(parser)
    return parser


def _thp_mode() -> str | None:
    """The kernel's THP mode (the bracketed word), or None without THP."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def test_threads_are_restored(monkeypatch, in_process):
    monkeypatch.setattr(bench, "measure_floor", lambda device, nbytes: {"bandwidth_gbs": 10.0, "exp_ns": 1.0})
    monkeypatch.setattr(bench, "_FLOOR_CACHE", {})
    before = torch.get_num_threads()
    rows = bench.benchmark([TINY], rounds=1, warmup=0, threads=before + 1, memory=False, losses=["ours-dice"])
    assert torch.get_num_threads() == before
    assert in_process == ["default", "thp"] and [r["threads"] for r in rows] == [before + 1] * 2


def test_rows_hold_finite_times_and_consistent_ratios(tiny_rows):
    assert [(r["allocator"], r["loss"]) for r in tiny_rows] == [(a, k) for a in ("default", "thp") for k in PAIRS]
    by_key = {(r["allocator"], r["loss"]): r for r in tiny_rows}
    for r in tiny_rows:
        assert r["status"] == "ok", r
        assert r["shape"] == "1x3x8x8x8"
        assert r["logits_mb"] == pytest.approx(math.prod(TINY) * 4 / bench.MB)
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        # the time floor: the logits read once and their gradient written once, at the bandwidth measured
        assert r["bandwidth_gbs"] > 0
        assert r["floor_ms"] == pytest.approx(2 * r["logits_mb"] * bench.MB / (r["bandwidth_gbs"] * 1e9) * 1e3)
        assert r["time_vs_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        assert math.isnan(r["peak_mb"]) and math.isnan(r["mem_vs_monai"])  # memory=False
        assert r["memory_status"] == "not measured"
        assert math.isnan(r["time_vs_nnunet"])  # nnU-Net not requested
        monai = by_key[(r["allocator"], "monai-" + r["family"])]  # the counterpart measured in the same child
        assert math.isfinite(r["time_vs_monai"])
        assert r["time_vs_monai"] == pytest.approx(r["median_ms"] / monai["median_ms"])
    for allocator in ("default", "thp"):
        for fam in ("dice", "gdl", "dicece"):
            assert by_key[(allocator, "monai-" + fam)]["time_vs_monai"] == pytest.approx(1.0)


def test_each_setting_child_got_exactly_its_environment(tiny_rows):
    """The rows carry THP_MEM_ALLOC_ENABLE as each child saw it: unset in the default child although this process
    had it set to 1 when it started the children, and 1 in the thp child."""
    assert {r["thp_env"] for r in tiny_rows if r["allocator"] == "default"} == {None}
    assert {r["thp_env"] for r in tiny_rows if r["allocator"] == "thp"} == {"1"}


def test_child_env_sets_exactly_the_setting(monkeypatch):
    root = str(Path(bench.__file__).resolve().parents[2])  # the folder holding monai_gdl_plus/
    for parent in (None, "1", "0"):
        if parent is None:
            monkeypatch.delenv(bench.THP_ENV, raising=False)
        else:
            monkeypatch.setenv(bench.THP_ENV, parent)
        monkeypatch.setenv("SOME_USER_SETTING", "kept")
        default, thp = bench._child_env("default"), bench._child_env("thp", {"MALLOC_MMAP_THRESHOLD_": "65536"})
        assert bench.THP_ENV not in default, parent
        assert thp[bench.THP_ENV] == "1", parent
        assert default["SOME_USER_SETTING"] == thp["SOME_USER_SETTING"] == "kept"
        assert thp["MALLOC_MMAP_THRESHOLD_"] == "65536" and "MALLOC_MMAP_THRESHOLD_" not in default
        assert default["PYTHONPATH"].split(":")[0] == root


def test_memory_children_run_under_the_setting_of_their_run(monkeypatch):
    """The memory children of a setting's run get that setting, and a real memory child sees exactly its
    THP_MEM_ALLOC_ENABLE even when this process has it set to 1."""
    calls = []

    def fake_child(argv, allocator, what, **kwargs):
        calls.append((argv[1], allocator, kwargs.get("extra_env")))
        return {"peak_extra_bytes": 4096}

    monkeypatch.setattr(bench, "_run_child", fake_child)
    spec = bench._Run(shapes=(TINY,), losses=("ours-dice", "monai-dice"), rounds=1, warmup=0, threads=1,
                      device="cpu", memory=True, seed=0, compile=False)  # fmt: skip
    for allocator in ("thp", "default"):
        calls.clear()
        rows = bench._measure(spec, allocator, lambda _m: None)
        assert calls == [(k, allocator, bench.MALLOC_ENV) for k in ("ours-dice", "monai-dice")]
        assert all(r["peak_mb"] == 4096 / bench.MB and r["allocator"] == allocator for r in rows)
    monkeypatch.undo()
    monkeypatch.setenv(bench.THP_ENV, "1")
    argv = ["--_memory-case", "ours-dice", "--shape", "1,3,8,8,8", "--threads", "1"]
    for allocator, seen in (("default", None), ("thp", "1")):
        result = bench._run_child(argv, allocator, "memory child", extra_env=bench.MALLOC_ENV, timeout=300)
        assert result["thp_env"] == seen and result["peak_extra_bytes"] >= 0


def test_ratios_compare_rows_of_the_same_setting_only():
    """Synthetic rows where MONAI is 5x faster under thp: each setting's ratio uses its own MONAI and nnU-Net rows."""
    rows = []
    for allocator, ours, monai, nnunet in (("default", 30.0, 100.0, 60.0), ("thp", 10.0, 20.0, 40.0)):
        for key, ms in (("ours-dice", ours), ("monai-dice", monai), ("nnunet-memeff", nnunet)):
            rows.append({"loss": key, "allocator": allocator, "shape": "1x3x8x8x8", "median_ms": ms,
                         "peak_mb": ms / 10, "logits_mb": 1.0, "floor_ms": 1.0})  # fmt: skip
    bench._add_ratios(rows)
    by_key = {(r["allocator"], r["loss"]): r for r in rows}
    assert by_key[("default", "ours-dice")]["time_vs_monai"] == pytest.approx(0.3)
    assert by_key[("thp", "ours-dice")]["time_vs_monai"] == pytest.approx(0.5)
    assert by_key[("thp", "ours-dice")]["mem_vs_nnunet"] == pytest.approx(0.25)
    assert by_key[("default", "nnunet-memeff")]["time_vs_monai"] == pytest.approx(0.6)
    assert by_key[("thp", "monai-dice")]["time_vs_nnunet"] == pytest.approx(0.5)
    assert by_key[("thp", "ours-dice")]["peak_L"] == pytest.approx(1.0)


def test_settings_run_by_default_and_on_request(in_process, monkeypatch):
    monkeypatch.setattr(bench, "measure_floor", lambda device, nbytes: {"bandwidth_gbs": 10.0, "exp_ns": 1.0})
    kwargs = {"rounds": 1, "warmup": 0, "memory": False, "losses": ["ours-dice"]}
    for allocators, expected in ((None, ["default", "thp"]), ("thp", ["thp"]), (["thp", "default"], ["default", "thp"]),
                                 (["default,default"], ["default"])):  # fmt: skip
        in_process.clear()
        rows = bench.benchmark([TINY], allocators=allocators, **kwargs)
        assert in_process == expected
        assert [r["allocator"] for r in rows] == expected


def test_a_failed_setting_is_reported_and_the_other_kept(in_process, monkeypatch, capsys):
    real = bench._run_setting

    def run(spec, allocator, say):
        if allocator == "thp":
            raise RuntimeError("timing subprocess (thp) failed (exit -9): killed")
        return real(spec, allocator, say)

    monkeypatch.setattr(bench, "_run_setting", run)
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--rounds", "1", "--warmup", "0", "--no-memory",
                                 "--losses", "ours-dice,monai-dice"])  # fmt: skip
    assert bench.run(args) == 1
    printed = capsys.readouterr().out
    assert "== allocator thp:" in printed
    assert "DicePlusLoss: error: RuntimeError: timing subprocess (thp) failed (exit -9): killed [1x3x8x8x8]" in printed
    default_block = printed.split("== allocator thp:")[0]
    assert default_block.count("DicePlusLoss  ") == 1 and "MONAI DiceLoss  " in default_block


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


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("madvise", "always"),
                    reason="needs Linux with transparent huge pages in madvise or always mode")
def test_thp_child_backs_a_large_fresh_tensor_with_huge_pages(monkeypatch):
    """In a child started with the thp setting's environment, the first write to a fresh 48 MiB tensor maps huge
    pages (or tries to: the kernel may fall back when it has none free, which /proc/vmstat counts); in the default
    child, on a kernel in madvise mode, none. This process has THP_MEM_ALLOC_ENABLE=1, which must not leak."""
    code = (
        "import json, torch\n"
        "from monai_gdl_plus.app import bench\n"
        "def fallback():\n"
        "    return sum(int(v) for k, v in (l.split() for l in open('/proc/vmstat')) if k == 'thp_fault_fallback')\n"
        "before = fallback()\n"
        "t = torch.empty(48 * 2**20 // 4)\n"
        "t.fill_(1.0)\n"
        "print(json.dumps({'huge_kb': bench._anon_huge_kb(t.data_ptr() + 24 * 2**20), 'fallbacks': fallback() - before,"
        " 'share': bench._huge_page_share(48 * 2**20)}))\n"
    )
    monkeypatch.setenv(bench.THP_ENV, "1")
    seen = {}
    for allocator in ("default", "thp"):
        proc = subprocess.run([sys.executable, "-c", code], env=bench._child_env(allocator), capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[allocator] = json.loads(proc.stdout.splitlines()[-1])
    assert seen["thp"]["huge_kb"] > 0 or seen["thp"]["fallbacks"] > 0, seen
    if seen["thp"]["fallbacks"] == 0:
        assert seen["thp"]["share"] > 0.5, seen
    if _thp_mode() == "madvise":
        assert seen["default"]["huge_kb"] == 0 and seen["default"]["share"] == 0.0, seen


def test_unavailable_nnunet_is_reported_not_raised(monkeypatch, in_process):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # makes `import nnunetv2...` raise ImportError
    rows = bench.benchmark([TINY], rounds=1, warmup=0, memory=False, losses=["ours-dice", "nnunet-memeff"],
                           allocators="default")  # fmt: skip
    by_key = {r["loss"]: r for r in rows}
    assert by_key["nnunet-memeff"]["status"].startswith("not installed")
    assert by_key["ours-dice"]["status"] == "ok"
    assert math.isnan(by_key["ours-dice"]["time_vs_nnunet"])
    table = bench.format_table(rows)
    assert "nnU-Net MemoryEfficientSoftDiceLoss: not installed" in table


def test_nnunet_ratio_when_installed(in_process):
    pytest.importorskip("nnunetv2.training.loss.dice")
    rows = bench.benchmark([TINY], rounds=1, warmup=0, memory=False, losses=["ours-dice", "nnunet"],
                           allocators="default")  # fmt: skip
    by_key = {r["loss"]: r for r in rows}
    assert by_key["nnunet-memeff"]["status"] == "ok"
    ours = by_key["ours-dice"]
    assert ours["time_vs_nnunet"] == pytest.approx(ours["median_ms"] / by_key["nnunet-memeff"]["median_ms"])


def test_contended_samples_are_repeated_within_a_budget(monkeypatch, in_process):
    waits = iter(range(0, 10**12, 10**9))  # every sample sees 1 s of run-queue wait
    monkeypatch.setattr(bench, "_sched_wait_ns", lambda: next(waits))
    losses, rounds = ["ours-dice", "monai-dice"], 3
    rows = bench.benchmark([TINY], rounds=rounds, warmup=0, memory=False, losses=losses, allocators="default")
    assert rounds * len(losses) > bench.MAX_RETRIES  # so the budget, not the per-sample cap, binds
    assert sum(r["retried"] for r in rows) == rounds * len(losses)  # one repeat per sample on average, no more
    assert all(math.isfinite(r["median_ms"]) for r in rows)
    assert all(r["wait_pct"] > 100 for r in rows)  # 1 s of wait in a sample of far less than a second
    assert "WARNING 1x3x8x8x8 (default): threads waited for a CPU" in bench.format_table(rows)
    monkeypatch.setattr(bench, "_sched_wait_ns", lambda: 0)
    rows = bench.benchmark([TINY], rounds=rounds, warmup=0, memory=False, losses=losses, allocators="default")
    assert [(r["retried"], r["wait_pct"]) for r in rows] == [(0, 0.0), (0, 0.0)]
    assert "WARNING" not in bench.format_table(rows)


def test_failing_loss_is_reported_and_others_still_measured(monkeypatch, in_process):
    real = bench._make_loss

    class Broken(torch.nn.Module):
        def forward(self, x, y):
            raise RuntimeError("boom")

    def make(key, compiled=False):
        return Broken() if key == "ours-gdl" else real(key)

    monkeypatch.setattr(bench, "_make_loss", make)
    rows = bench.benchmark([TINY], rounds=1, warmup=1, memory=False, losses=["ours-gdl", "monai-gdl"],
                           allocators="default")  # fmt: skip
    by_key = {r["loss"]: r for r in rows}
    assert by_key["ours-gdl"]["status"] == "error: RuntimeError: boom"
    assert math.isfinite(by_key["monai-gdl"]["median_ms"])
    assert "GeneralizedDicePlusLoss: error: RuntimeError: boom" in bench.format_table(rows)


def test_failed_memory_child_keeps_the_time(monkeypatch, capsys, in_process):
    def fail(key, shape, threads, seed, compiled=False, allocator="default"):
        raise RuntimeError(f"memory subprocess for {key} failed (exit 1): boom")

    monkeypatch.setattr(bench, "_peak_cpu_subprocess", fail)
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--rounds", "1", "--warmup", "0", "--losses", "ours-dice",
                                 "--allocator", "default"])  # fmt: skip
    assert bench.run(args) == 1
    printed = capsys.readouterr().out
    row_line = next(line for line in printed.splitlines() if line.startswith("DicePlusLoss  "))
    assert math.isfinite(float(row_line.split()[2]))  # the median time is still there
    assert "DicePlusLoss: memory error: RuntimeError: memory subprocess for ours-dice failed (exit 1): boom" in printed


@pytest.mark.slow
def test_memory_subprocess_reports_peak_including_the_gradient():
    shape = (1, 4, 64, 64, 64)  # logits of 4 MB: well above malloc's mmap threshold and RSS counter granularity
    rows = bench.benchmark([shape], rounds=1, warmup=0, memory=True, losses=["ours-dice", "monai-dice"])
    assert [r["allocator"] for r in rows] == ["default", "default", "thp", "thp"]
    for r in rows:
        assert (r["status"], r["memory_status"]) == ("ok", "ok"), r
        assert math.isfinite(r["peak_mb"]) and r["peak_mb"] > 0
        assert r["peak_L"] == pytest.approx(r["peak_mb"] * bench.MB / (math.prod(shape) * 4))
        assert r["peak_L"] > 0.5  # x.grad alone is 1.0 L
        assert math.isfinite(r["mem_vs_monai"])
    assert rows[1]["mem_vs_monai"] == pytest.approx(1.0) and rows[3]["mem_vs_monai"] == pytest.approx(1.0)


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
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("measured before checking `--csv`"))
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--no-memory", "--csv", str(target)])
    assert bench.run(args) == 2
    err = capsys.readouterr().err
    assert "`--csv`" in err and ("does not exist" in err if where == "missing-folder" else "is a folder" in err)


def test_parser_defaults_and_repeated_shapes():
    args = _parser().parse_args([])
    assert (args.rounds, args.warmup, args.threads, args.device, args.memory) == (7, 2, 2, "cpu", True)
    assert args.shapes is None and args.losses is None and args.csv is None and args.allocators is None
    assert bench._resolve_allocators(args.allocators, "cpu") == ["default", "thp"]
    assert bench._resolve_allocators(args.allocators, "cuda") == ["default"]
    argv = ["--shape", "1,3,8,8,8", "2x4x6x6x6", "--shape", "1,2,4,4", "--losses", "ours", "monai-gdl",
            "--allocator", "thp", "--allocator", "default,thp"]  # fmt: skip
    args = _parser().parse_args(argv)
    assert bench._resolve_allocators(args.allocators, "cpu") == ["default", "thp"]
    assert bench._resolve_allocators(_parser().parse_args(["--allocator", "thp"]).allocators, "cpu") == ["thp"]
    assert args.shapes == [(1, 3, 8, 8, 8), (2, 4, 6, 6, 6), (1, 2, 4, 4)]
    assert bench._resolve_losses(args.losses) == [
        "ours-dice", "ours-gdl", "ours-dicece", "ours-dicefocal", "ours-tversky", "monai-gdl",
    ]  # fmt: skip
    assert bench._resolve_losses(["core"]) == [*PAIRS, "nnunet-memeff"]


@pytest.mark.parametrize(
    ("text", "match"),
    [("2,4", "at least one spatial axis"), ("2,1,8,8,8", "at least 2 classes"), ("2,a,8,8", "comma-separated"),
     ("0,3,8,8", "sizes >= 1")],
)  # fmt: skip
def test_bad_shape(text, match, capsys):
    with pytest.raises(ValueError, match=match):
        bench.parse_shape(text)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--shape", text])
    assert "--shape" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`losses` must be one of .*'monai-dice'"):
        bench.benchmark([TINY], losses=["monai-dise"])
    with pytest.raises(ValueError, match="`rounds` must be >= 1, got 0"):
        bench.benchmark([TINY], rounds=0)
    with pytest.raises(TypeError, match="`threads` must be an int, got float 1.5"):
        bench.benchmark([TINY], threads=1.5)
    with pytest.raises(ValueError, match="`device` must be one of"):
        bench.benchmark([TINY], device="tpu")
    with pytest.raises(ValueError, match="`shapes` must hold at least one shape"):
        bench.benchmark([])
    with pytest.raises(ValueError, match=r"`allocators` must be one of \('default', 'thp'\), got 'tph'"):
        bench.benchmark([TINY], allocators=["default,tph"])
    with pytest.raises(ValueError, match="`allocators` must name at least one of"):
        bench.benchmark([TINY], allocators=[","])
    with pytest.raises(ValueError, match="`allocators` 'thp' sets PyTorch's CPU allocator .* device 'cuda'"):
        bench._resolve_allocators(["default", "thp"], "cuda")


def test_cli_bad_value_is_one_line_error(capsys):
    args = _parser().parse_args(["--shape", "1,3,8,8,8", "--rounds", "0"])
    assert bench.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gdl-plus bench: error: `rounds` must be >= 1, got 0."


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
    monkeypatch.setattr(bench, "_median_time", fake_median)
    fresh_s, warm_s = 0.0075, 0.0025
    assert bench.measure_first_touch(n, repeats=3) == pytest.approx(5.0)
    assert len(allocated) == 2 and all(t.numel() == n // 4 for t in allocated)
    fresh_s, warm_s = 0.001, 0.004
    assert bench.measure_first_touch(n, repeats=3) == 0.0


def test_measure_floor_is_positive():
    floor = bench.measure_floor(nbytes=4 * 2**20, repeats=2)
    assert floor["bandwidth_gbs"] > 0 and math.isfinite(floor["bandwidth_gbs"])
    assert floor["exp_ns"] > 0 and math.isfinite(floor["exp_ns"])


def test_measure_floor_arithmetic(monkeypatch):
    """With a timer that says 1 ms per copy and 2 ms per exp pass of 2**20 floats: bytes read + written per second,
    and nanoseconds per element, exactly (a floor 10x off, or read-only bytes, fails here)."""
    times = iter([1e-3, 2e-3])
    monkeypatch.setattr(bench, "_median_time", lambda fn, device, repeats: next(times))
    floor = bench.measure_floor(nbytes=4 * 2**20, repeats=1)
    assert floor["bandwidth_gbs"] == pytest.approx(2 * 4 * 2**20 / 1e-3 / 1e9)
    assert floor["exp_ns"] == pytest.approx(2e-3 / 2**20 * 1e9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_hold_time_and_memory():
    rows = bench.benchmark([TINY], rounds=1, warmup=1, device="cuda", losses=["ours-dice", "monai-dice"])
    for r in rows:
        assert r["status"] == "ok", r
        assert r["device"] == "cuda" and r["retried"] == 0
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert r["peak_mb"] > 0 and r["peak_L"] >= 1.0  # x.grad is allocated inside the measured step
        assert math.isfinite(r["time_vs_monai"]) and math.isfinite(r["mem_vs_monai"])
        assert math.isnan(r["exp_floor_ms"]) and r["allocator"] == "default" and r["thp_env"] is None


def test_accelerator_code_paths_give_ok_rows_on_cpu(monkeypatch, in_process):
    """The CPU counterpart of the CUDA rows: with ``_ops.HOST_DEVICES`` empty our losses run what they run on an
    accelerator (blocked class sums, always-shifted softmax, asynchronous checks); every row is measured, and our
    losses still agree with MONAI's (the harness would time a wrong loss as readily as a right one)."""
    monkeypatch.setattr(bench, "measure_floor", lambda device, nbytes: {"bandwidth_gbs": 10.0, "exp_ns": 1.0})
    monkeypatch.setattr(bench, "_FLOOR_CACHE", {})
    monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    shape = (2, 3, 16, 16, 20)  # 5120 voxels per sample: two blocks of class sums, the last one ragged
    assert math.prod(shape[2:]) > _ops.BLOCK
    rows = bench.benchmark([shape], rounds=1, warmup=1, memory=False, losses=PAIRS, allocators="default")
    for r in rows:
        assert r["status"] == "ok", r
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert math.isfinite(r["time_vs_monai"])
    x, y = bench._make_inputs(shape, "cpu", 0)
    for fam in ("dice", "dicece"):  # (GDL departs from MONAI's by design: normalised weights, the empty rule)
        ours, monai = bench._make_loss("ours-" + fam)(x, y), bench._make_loss("monai-" + fam)(x, y)
        torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-6)


class _FakeCuda:
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
    fake = _FakeCuda(step_ms=12.5, step_bytes=3 * 2**20, base_bytes=5 * 2**20)
    for name in ("Event", "synchronize", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    x, y = bench._make_inputs(TINY, "cpu", 0)
    ms, retried, wait = bench._time_step(fake.loss, x, y, "cuda")
    assert (ms, retried) == (12.5, 0) and math.isnan(wait)
    assert fake.synced >= 2  # before the start event and on the end event
    fake.peak = 10 * 2**30  # a high-water mark left by an earlier step must not count
    assert bench._peak_cuda(fake.loss, x, y) == 3 * 2**20


def _rows_for_targets(ours_ms: float, ours_mb: float) -> list[dict]:
    """Synthetic rows at the issue shapes: MONAI 100 ms / 300 MB, nnU-Net 80 ms / 300 MB, ours as given."""
    rows = []
    for shape in ("2x16x64x64x64", "1x105x64x64x64"):
        for key in bench.LOSSES:
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
