"""``benchmark`` (monai_gdl_plus.app.bench.runner): its arguments, one child per allocator setting, the rows they
send back and the ratios added to them, on tiny shapes.

No wall-clock assertion anywhere: only that figures exist, are finite and are combined consistently, and that each
child process gets exactly the environment of its allocator setting.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from monai_gdl_plus import _ops
from monai_gdl_plus.app import bench
from monai_gdl_plus.app.bench import measure, probes, registry, runner, timing

TINY = (1, 3, 8, 8, 8)
PAIRS = ["ours-dice", "ours-gdl", "ours-dicece", "monai-dice", "monai-gdl", "monai-dicece"]


def test_threads_are_restored(fake_floor, in_process):
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
        assert r["logits_mb"] == pytest.approx(math.prod(TINY) * 4 / measure.MB)
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        # the floor is 2 L at the bandwidth the child measured (the bandwidth itself: test_bench_timing.py)
        assert r["floor_ms"] == pytest.approx(2 * math.prod(TINY) * 4 / (r["bandwidth_gbs"] * 1e9) * 1e3)
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


def test_settings_run_by_default_and_on_request(in_process, fake_floor):
    kwargs = {"rounds": 1, "warmup": 0, "memory": False, "losses": ["ours-dice"]}
    for allocators, expected in ((None, ["default", "thp"]), ("thp", ["thp"]), (["thp", "default"], ["default", "thp"]),
                                 (["default,default"], ["default"])):  # fmt: skip
        in_process.clear()
        rows = bench.benchmark([TINY], allocators=allocators, **kwargs)
        assert in_process == expected
        assert [r["allocator"] for r in rows] == expected


def test_a_failed_setting_gives_error_rows_with_its_environment(in_process, monkeypatch):
    real = runner.run_setting

    def run(spec, allocator, say):
        if allocator == "thp":
            raise RuntimeError("timing subprocess (thp) failed (exit -9): killed")
        return real(spec, allocator, say)

    monkeypatch.setattr(runner, "run_setting", run)
    rows = bench.benchmark([TINY], rounds=1, warmup=0, memory=False, losses=["ours-dice", "monai-dice"])
    thp = [r for r in rows if r["allocator"] == "thp"]
    assert [r["loss"] for r in thp] == ["ours-dice", "monai-dice"]
    assert {r["status"] for r in thp} == {"error: RuntimeError: timing subprocess (thp) failed (exit -9): killed"}
    assert {r["thp_env"] for r in thp} == {"1"} and all(math.isnan(r["median_ms"]) for r in thp)
    assert all(r["status"] == "ok" for r in rows if r["allocator"] == "default")


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
    monkeypatch.setattr(probes, "sched_wait_ns", lambda: next(waits))
    losses, rounds = ["ours-dice", "monai-dice"], 3
    rows = bench.benchmark([TINY], rounds=rounds, warmup=0, memory=False, losses=losses, allocators="default")
    assert rounds * len(losses) > timing.MAX_RETRIES  # so the budget, not the per-sample cap, binds
    assert sum(r["retried"] for r in rows) == rounds * len(losses)  # one repeat per sample on average, no more
    assert all(math.isfinite(r["median_ms"]) for r in rows)
    assert all(r["wait_pct"] > 100 for r in rows)  # 1 s of wait in a sample of far less than a second
    assert "WARNING 1x3x8x8x8 (default): threads waited for a CPU" in bench.format_table(rows)
    monkeypatch.setattr(probes, "sched_wait_ns", lambda: 0)
    rows = bench.benchmark([TINY], rounds=rounds, warmup=0, memory=False, losses=losses, allocators="default")
    assert [(r["retried"], r["wait_pct"]) for r in rows] == [(0, 0.0), (0, 0.0)]
    assert "WARNING" not in bench.format_table(rows)


@pytest.mark.parametrize(
    ("text", "match"),
    [("2,4", "at least one spatial axis"), ("2,1,8,8,8", "at least 2 classes"), ("2,a,8,8", "comma-separated"),
     ("0,3,8,8", "sizes >= 1")],
)  # fmt: skip
def test_bad_shape(text, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_shape(text)


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


def test_accelerator_code_paths_give_ok_rows_on_cpu(monkeypatch, in_process, fake_floor):
    """The CPU counterpart of the CUDA rows: with ``_ops.HOST_DEVICES`` empty our losses run what they run on an
    accelerator (blocked class sums, always-shifted softmax, asynchronous checks); every row is measured, and our
    losses still agree with MONAI's (the harness would time a wrong loss as readily as a right one)."""
    monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    shape = (2, 3, 16, 16, 20)  # 5120 voxels per sample: two blocks of class sums, the last one ragged
    assert math.prod(shape[2:]) > _ops.BLOCK
    rows = bench.benchmark([shape], rounds=1, warmup=1, memory=False, losses=PAIRS, allocators="default")
    for r in rows:
        assert r["status"] == "ok", r
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert math.isfinite(r["time_vs_monai"])
    x, y = timing.make_inputs(shape, "cpu", 0)
    for fam in ("dice", "dicece"):  # (GDL departs from MONAI's by design: normalised weights, the empty rule)
        ours, monai = registry.make_loss("ours-" + fam)(x, y), registry.make_loss("monai-" + fam)(x, y)
        torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-6)
