"""The traffic count (monai_gdl_plus.app.bench.traffic, ``gdl-plus bench --traffic``): the counter on cases whose
bytes are known exactly, MONAI DiceLoss against its ops written out, our label-map path against the 3 L floor,
the kernel-source hook, the table and the CLI."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from monai_gdl_plus.app import bench
from monai_gdl_plus.app.bench import registry, report, traffic

N = 1000
F32 = 4


def _count(fn) -> tuple[traffic.Traffic, traffic.TrafficCounter]:
    with traffic.TrafficCounter() as counter:
        fn()
    return counter.result(), counter


def test_an_elementwise_op_reads_its_inputs_and_writes_its_output():
    a, b = torch.randn(N), torch.randn(N)
    got, counter = _count(lambda: a + b)
    assert got == traffic.Traffic(bytes_read=2 * N * F32, bytes_written=N * F32, launches=1)
    assert dict(counter.ops) == {"aten.add.Tensor": 1}
    got, _ = _count(lambda: a.double() * 2)  # a copy to float64, then a product in float64
    assert got == traffic.Traffic(N * F32 + N * 8, N * 8 + N * 8, 2)


def test_views_move_nothing_and_launch_nothing():
    a = torch.randn(4, 5, 6)
    got, counter = _count(lambda: (a.view(20, 6).t(), a.permute(2, 0, 1), a[1:, 2], a.expand(3, 4, 5, 6),
                                   a.unsqueeze(0).squeeze(0), a.detach(), a.reshape(-1), a.as_strided((2,), (1,))))
    assert got == traffic.Traffic(0, 0, 0) and not counter.ops


def test_a_scalar_read_back_is_one_launch_reading_one_element():
    a = torch.randn(N)
    got, _ = _count(lambda: a[3].item())
    assert got == traffic.Traffic(F32, 0, 1)


def test_allocations_write_nothing_a_fill_writes():
    got, _ = _count(lambda: (torch.empty(N), torch.empty_like(torch.empty(N))))
    assert got == traffic.Traffic(0, 0, 0)
    got, _ = _count(lambda: torch.zeros(N))
    assert got == traffic.Traffic(0, N * F32, 1)


def test_in_place_and_out_ops_write_the_mutated_tensor():
    a, b, c = torch.randn(N), torch.randn(N), torch.empty(N)
    got, _ = _count(lambda: a.mul_(b))  # reads a and b, writes a
    assert got == traffic.Traffic(2 * N * F32, N * F32, 1)
    got, _ = _count(lambda: torch.exp(a, out=c))  # reads a; c is written, not read
    assert got == traffic.Traffic(N * F32, N * F32, 1)
    got, _ = _count(lambda: c.copy_(a))  # copy_ overwrites c whole: not read
    assert got == traffic.Traffic(N * F32, N * F32, 1)
    got, _ = _count(lambda: c.zero_())
    assert got == traffic.Traffic(0, N * F32, 1)


def test_a_tensor_read_twice_by_one_op_counts_once_and_a_broadcast_its_distinct_elements():
    a = torch.randn(64, 64)
    got, _ = _count(lambda: a * a)
    assert got == traffic.Traffic(64 * 64 * F32, 64 * 64 * F32, 1)
    row = torch.randn(1, 64)
    got, _ = _count(lambda: a + row.expand(64, 64))  # the expanded row: 64 distinct elements
    assert got == traffic.Traffic((64 * 64 + 64) * F32, 64 * 64 * F32, 1)
    assert traffic.tensor_bytes(row.expand(64, 64)) == 64 * F32
    col = a[:, :1].expand(64, 64)  # 64 distinct elements of a 4096-element storage
    got, _ = _count(lambda: a * col)
    assert got == traffic.Traffic((64 * 64 + 64) * F32, 64 * 64 * F32, 1)
    assert traffic.tensor_bytes(a.t()) == 64 * 64 * F32 and traffic.tensor_bytes(a[:, :8]) == 64 * 8 * F32


def test_scatter_and_gather_count_the_elements_their_index_addresses():
    x = torch.randn(2, 16, N)
    idx = torch.randint(0, 16, (2, 1, N))
    src = torch.randn(2, 1, N)
    got, _ = _count(lambda: x.scatter_add_(1, idx, src))  # index and src read; 2N elements of x read and written
    assert got == traffic.Traffic(2 * N * 8 + 2 * N * F32 + 2 * N * F32, 2 * N * F32, 1)
    got, _ = _count(lambda: torch.gather(x, 1, idx))  # index read, 2N elements of x read, 2N written
    assert got == traffic.Traffic(2 * N * 8 + 2 * N * F32, 2 * N * F32, 1)


@torch.library.custom_op("traffic_test::add_twice", mutates_args=())
def _add_twice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a + b) + b


@torch.library.custom_op("traffic_test::numpy_add", mutates_args=())
def _numpy_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.add(a.numpy(), b.numpy()))  # no aten op the dispatcher sees


def test_a_custom_op_counts_the_aten_ops_it_runs_or_one_opaque_launch():
    a, b = torch.randn(N), torch.randn(N)
    got, counter = _count(lambda: _add_twice(a, b))
    assert got == traffic.Traffic(4 * N * F32, 2 * N * F32, 2)
    assert dict(counter.ops) == {"aten.add.Tensor": 2}
    got, counter = _count(lambda: _numpy_add(a, b))
    assert got == traffic.Traffic(2 * N * F32, N * F32, 1)
    assert dict(counter.ops) == {"traffic_test.numpy_add.default": 1}


def test_the_library_custom_op_is_counted_by_its_inner_ops():
    """``monai_gdl_plus::label_terms`` (what a compiled loss calls) runs chunked torch code: its count is that code's
    launches, reading the logits at least once, not one opaque launch."""
    x = torch.randn(2, 4, 500)
    labels = torch.randint(0, 4, (2, 500))
    got, counter = _count(lambda: torch.ops.monai_gdl_plus.label_terms(x, labels, None, None, True, False, False))
    assert got.launches > 5 and "monai_gdl_plus.label_terms.default" not in counter.ops
    assert got.bytes_read >= x.numel() * F32


def _row(key: str, device="meta", shape=(2, 16, 16, 16, 16), source="aten ops", dtype="float32") -> dict:
    rows = traffic.traffic_rows([shape], losses=[key], device=device, dtype=dtype)
    (row,) = [r for r in rows if r["source"] == source]
    assert row["status"] == "ok", row["status"]
    return row


@pytest.mark.parametrize("key", ["ours-dice", "ours-dicece", "ours-dicefocal"])
def test_the_triton_kernels_move_about_the_floor(key):
    """The library's Triton kernels (their own count of loads and stores, through ``functional.kernel_traffic``): one
    read of the logits forward, one read and one gradient write backward, plus the int64 labels (read twice: 16/C
    bytes a logit, 0.25 L at C = 16) -- 3.3 L in at most 7 launches, against the torch path's 15.8 L in hundreds."""
    row = _row(key, shape=(2, 16, 64, 64, 64), source="kernels")
    assert 3.0 <= row["total_L"] <= 3.4 and row["written_L"] == pytest.approx(1.0, abs=0.03)
    assert row["launches"] <= 7


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_monai_dice_moves_what_its_ops_move(device):
    """MONAI DiceLoss, written out: softmax (read L, write L), one-hot (zeros: write L; scatter_: read the labels,
    write 1/C of it), intersection product (read 2 L, write L) and three sums (read 3 L); backward: the two products'
    and the prediction sum's gradients (read L, write L each, one add of two of them: read L, write L) and the
    softmax backward (read 2 L, write L): 16 L, plus the int64 labels (2/C L) and the scattered ones (1/C L)."""
    b, c, *_ = shape = (2, 16, 16, 16, 16)
    row = _row("monai-dice", device, shape)
    assert row["total_L"] == pytest.approx(16 + 2 / c + 1 / c, abs=0.02)  # the (B, C) terms: < 0.02 L here


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_ours_moves_less_than_monai_and_at_least_the_floor(device):
    """Our label-map torch path, as measured (total, at (2, 16, *)): 15.8 L on the accelerator route (meta; the
    shifted softmax's max and subtraction passes, one logits-sized backward temporary), 12.0 L on the host route.
    Both below MONAI DiceLoss's 16.2 L, above the 3 L floor; the bounds sit just above what is measured, so that an
    extra logits-sized pass fails them."""
    ours, monai = _row("ours-dice", device), _row("monai-dice", device)
    assert 3.0 <= ours["total_L"] < monai["total_L"]
    assert ours["total_L"] <= {"meta": 16.0, "cpu": 12.5}[device]
    assert ours["written_L"] < monai["written_L"]


def test_byte_ratios_do_not_depend_on_the_volume():
    small, large = _row("ours-dice", shape=(2, 16, 16, 16, 16)), _row("ours-dice", shape=(2, 16, 128, 128, 128))
    assert large["total_L"] == pytest.approx(small["total_L"], abs=0.05)
    assert large["launches"] > small["launches"]  # more chunks (meta: 2^24 elements a chunk, as on CUDA)


def test_our_losses_are_counted_on_their_torch_path(monkeypatch):
    """Triton launches are invisible to a dispatch mode: the library's kernel switch says ``torch`` while a step is
    counted, and is restored after."""
    seen = []

    def loss(x, y):
        seen.append(os.environ.get(traffic.KERNELS_ENV))
        return x.sum()

    monkeypatch.setenv(traffic.KERNELS_ENV, "triton")
    monkeypatch.setattr(registry, "build_loss", lambda key: loss)
    (row, _kernels) = traffic.traffic_rows([(1, 3, 4, 4, 4)], losses=["ours-dice"])
    assert seen == ["torch"] and os.environ[traffic.KERNELS_ENV] == "triton" and row["status"] == "ok"
    monkeypatch.delenv(traffic.KERNELS_ENV)
    traffic.traffic_rows([(1, 3, 4, 4, 4)], losses=["ours-dice"])
    assert seen[-1] == "torch" and traffic.KERNELS_ENV not in os.environ


def test_a_kernel_source_gives_a_row_per_loss_of_ours(monkeypatch):
    calls = []

    def fake(b, c, n, dtype, flags):
        calls.append((b, c, n, dtype, flags["with_ce"]))
        return 2 * b * c * n * 4, b * c * n * 4, 2

    def broken(b, c, n, dtype, flags):
        raise RuntimeError("no kernel for that")

    monkeypatch.setattr(traffic, "KERNEL_SOURCES", {})
    monkeypatch.setattr(traffic, "LIBRARY_KERNEL_TRAFFIC", ("monai_gdl_plus.functional", "no_such_count"))
    traffic.register_kernel_source("fake", "fake kernels", fake)
    traffic.register_kernel_source("broken", "broken kernels", broken)
    rows = traffic.traffic_rows([(1, 3, 4, 4, 4)], losses=["ours-dice", "ours-dicece", "monai-dice"])
    assert [r["label"] for r in rows] == [
        "DicePlusLoss", "DicePlusLoss [fake kernels]", "DicePlusLoss [broken kernels]",
        "DicePlusLoss(lambda_ce=1)", "DicePlusLoss(lambda_ce=1) [fake kernels]",
        "DicePlusLoss(lambda_ce=1) [broken kernels]", "MONAI DiceLoss",
    ]  # fmt: skip
    assert calls == [(1, 3, 64, torch.float32, False), (1, 3, 64, torch.float32, True)]
    fake_row = rows[1]
    assert (fake_row["read_L"], fake_row["written_L"], fake_row["total_L"], fake_row["launches"]) == (2, 1, 3, 2)
    assert rows[2]["status"] == "error: RuntimeError: no kernel for that"


def test_the_library_kernel_count_is_picked_up_when_published(monkeypatch):
    module_name, attr = traffic.LIBRARY_KERNEL_TRAFFIC
    module = __import__(module_name, fromlist=[attr])
    seen = []

    def kernel_traffic(b, c, n, dtype=torch.float32, *, softmax=True, squared=False, with_ce=False, focal=0):
        seen.append((b, c, n, dtype, softmax, squared, with_ce, focal))
        logits = b * c * n * dtype.itemsize
        return 2 * logits, logits, 6, logits  # (read, written, launches, L), as the library's Traffic

    monkeypatch.setattr(module, attr, kernel_traffic, raising=False)
    assert traffic.kernel_sources()["kernels"][0] == "Triton kernels"
    rows = traffic.traffic_rows([(1, 3, 4, 4, 4)], losses=["ours-dicefocal"], dtype="float16")
    assert rows[1]["label"] == "DiceFocalPlusLoss [Triton kernels]"
    assert (rows[1]["total_L"], rows[1]["launches"]) == (3.0, 6)
    assert seen == [(1, 3, 64, torch.float16, True, False, False, 1)]


def test_half_logits_count_l_in_their_own_bytes():
    """L is the logits' bytes in their dtype; our path computes in float32, so its multiple of L is larger."""
    shape = (2, 16, 16, 16, 16)
    half, full = (_row("ours-dice", shape=shape, dtype=dtype) for dtype in ("float16", "float32"))
    assert half["logits_bytes"] == 2 * 16 * 16**3 * 2 and full["logits_bytes"] == 2 * half["logits_bytes"]
    assert half["dtype"] == "float16" and half["total_L"] > full["total_L"] + 10


def test_table_prints_every_row_and_the_missing_ones():
    rows = traffic.traffic_rows([(1, 4, 8, 8, 8)], losses=["ours-dice", "monai-dice", "nnunet-memeff"])
    table = report.format_traffic_table(rows)
    lines = table.splitlines()
    assert lines[0] == "== traffic per forward+backward step, float32 logits, counted on meta =="
    assert lines[1].split() == ["loss", "shape", "read/L", "written/L", "total/L", "launches"]
    for r in (r for r in rows if r["status"] == "ok"):
        line = next(x for x in lines if x.startswith(r["label"] + "  "))
        assert line.split()[-4:] == [f"{r['read_L']:.2f}", f"{r['written_L']:.2f}", f"{r['total_L']:.2f}",
                                     str(r["launches"])]  # fmt: skip
    if rows[2]["status"] != "ok":
        assert f"{rows[2]['label']}: {rows[2]['status']} [1x4x8x8x8]" in table
    assert "1x4x8x8x8: L = 0.0 MB" in table and "TorchDispatchMode" in table.replace("\n", " ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdl-plus bench")
    bench.configure_parser(parser)
    return parser


def test_cli_traffic_prints_the_table_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "traffic.csv"
    args = _parser().parse_args(["--traffic", "--shape", "1,3,8,8,8", "--losses", "ours-dice,monai-dice",
                                 "--traffic-device", "cpu", "--csv", str(out)])  # fmt: skip
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    assert "counted on cpu" in printed and "DicePlusLoss  " in printed and "MONAI DiceLoss  " in printed
    assert "ms" not in printed.splitlines()[1].split()  # the timing table's columns are not there
    header = out.read_text().splitlines()[0].split(",")
    assert {"loss", "read_L", "written_L", "total_L", "launches"} <= set(header)


def test_cli_traffic_refuses_compile(capsys):
    args = _parser().parse_args(["--traffic", "--compile", "--shape", "1,3,8,8,8", "--losses", "ours-dice"])
    assert bench.run(args) == 2
    assert "`--traffic` counts the eager step's aten ops" in capsys.readouterr().err


def test_bad_device_and_loss_are_named():
    with pytest.raises(ValueError, match="device"):
        traffic.traffic_rows([(1, 3, 4, 4, 4)], device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        traffic.traffic_rows([(1, 3, 4, 4, 4)], dtype="float64")
    with pytest.raises(ValueError, match="losses"):
        traffic.traffic_rows([(1, 3, 4, 4, 4)], losses=["ours-nothing"])
    assert registry.LOSSES  # the rows follow the registry's order
