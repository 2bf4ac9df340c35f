"""The Triton kernels on a lent GPU (never run by CI): CUDA parity, sync-free training steps, and the timing table.

    python benchmarks/gpu_kernels.py [--quick] [--out DIR] [--budget SECONDS]

1. **Parity**: DicePlusLoss, DiceCEPlusLoss, GeneralizedDicePlusLoss and DiceFocalPlusLoss (label maps,
   ``to_onehot_y=True``; softmax, sigmoid, ``ignore_index=255``, class weights) with ``MONAI_GDL_PLUS_KERNELS=triton``
   against ``=torch`` and against MONAI's class (where MONAI has the variant: not ``ignore_index``), value and
   gradient, float32 and float16 logits under ``torch.autocast("cuda", float16)``, C in {4, 16, 105, 133}. Under
   autocast MONAI is run in float32 on the float16 logits: autocast leaves its sigmoid and its products in float16,
   which our losses (float32 inside) are not meant to reproduce.
   Deviations are relative to the reference's largest magnitude; the bound is 1e-5, for a float16 gradient (written
   in the logits' dtype) float16's epsilon.
2. **Training step** on the Triton path (``gpu_check._sync_free_step``: Conv3d + loss forward/backward + SGD, the
   loss under ``torch.cuda.set_sync_debug_mode("error")``), eager and ``torch.compile``d, float32 and float16 AMP.
3. **Timing table** at (2, 16, 128^3) and (1, 105, 96^3), float32 and float16 logits under autocast: forward +
   backward of MONAI DiceLoss / DiceCELoss / GeneralizedDiceLoss and ours on the Triton and the torch path (CUDA
   events, median of 20 after warm-up, ``monai_gdl_plus.app.bench.timing.time_step``), ratios against MONAI, the
   floor ``3 L`` at the copy bandwidth measured here (a 1 GiB device-to-device copy), the kernels' own count of their
   traffic (``monai_gdl_plus.functional.kernel_traffic``), and the peak allocated above the inputs
   (``monai_gdl_plus.app.bench.memory.peak_cuda``, ``x.grad`` included) as multiples of L (the logits' bytes).
   Printed, and written to ``--out`` (``kernels_timing.csv``, ``gpu_kernels.json``).

Each part has a share of ``--budget`` (default 210 s; ``--quick``: 100 s, fewer classes and one timing shape); a part
whose time is spent skips its remaining cases with a printed note, so the whole run stays within the budget plus
the case in progress (largest: one timing case, a few seconds with its Triton compile). Exits 1 if a parity or
training-step check fails, 2 without CUDA; the issue's targets (>= 4x faster than MONAI, within 2x of the floor,
peak <= 1.1 L) are reported, not enforced. ``python benchmarks/gpu_check.py --kernels`` runs this after its own checks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monai_gdl_plus.app.bench import memory, registry, timing
from monai_gdl_plus.app.bench.traffic import KERNELS_ENV, kernels  # noqa: F401 (KERNELS_ENV: the switch's name, for callers)

PARITY_CLASSES = (4, 133, 16, 105)  # the extremes first: what a spent budget skips is C=16 and 105
QUICK_PARITY_CLASSES = (4, 133)
PARITY_SPATIAL = (2, 20, 20, 20)  # (B, *spatial): 8000 voxels a sample, not a multiple of any block
TIMING_SHAPES = ((2, 16, 128, 128, 128), (1, 105, 96, 96, 96))
TIMING_PAIRS = (("dice", "monai-dice", "ours-dice"), ("dicece", "monai-dicece", "ours-dicece"),
                ("gdl", "monai-gdl", "ours-gdl"))  # fmt: skip
REPEATS, WARMUP = 20, 3
RTOL = 1e-5
FLOOR_L = 3.0  # read the logits forward, read them and write the gradient backward
TARGETS = {"time_vs_monai": 0.25, "time_vs_floor": 2.0, "peak_L": 1.1}
# shares of --budget: parity, training steps, timing (the bandwidth measurement is part of timing)
SHARES = {"parity": 0.3, "train": 0.3, "timing": 0.4}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------------ budget


class TimeGuard:
    """A part's share of the run: :meth:`expired` once ``seconds`` have passed since construction; :meth:`skip`
    prints (once) what is left out. ``clock`` is injectable for tests."""

    def __init__(self, part: str, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.part, self.seconds, self.clock = part, seconds, clock
        self.start = clock()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def expired(self) -> bool:
        return self.elapsed() >= self.seconds

    def allows(self, case: str) -> bool:
        """Whether ``case`` may start; if not, it is recorded as skipped and the first skip is announced."""
        if not self.expired():
            return True
        if not self.skipped:
            print(f"[skip] {self.part}: its {self.seconds:.0f} s are spent; skipping the remaining cases")
        self.skipped.append(case)
        return False


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp)


# ------------------------------------------------------------------------------------------------------ parity


Factory = Callable[[], torch.nn.Module]


def parity_cases(c: int) -> list[tuple[str, Factory, Factory | None, int | None]]:
    """(name, ours, MONAI's or None, ignore label) for C classes: the four losses and their variants."""
    import monai.losses as ML

    from monai_gdl_plus import DiceCEPlusLoss, DiceFocalPlusLoss, DicePlusLoss, GeneralizedDicePlusLoss

    w = torch.linspace(0.5, 2.0, c).tolist()
    on = dict(to_onehot_y=True)
    return [
        ("Dice softmax", lambda: DicePlusLoss(**on, softmax=True), lambda: ML.DiceLoss(**on, softmax=True), None),
        ("Dice sigmoid squared", lambda: DicePlusLoss(**on, sigmoid=True, squared_pred=True),
         lambda: ML.DiceLoss(**on, sigmoid=True, squared_pred=True), None),
        ("Dice softmax ignore=255", lambda: DicePlusLoss(**on, softmax=True, ignore_index=255), None, 255),
        ("DiceCE softmax", lambda: DiceCEPlusLoss(**on, softmax=True), lambda: ML.DiceCELoss(**on, softmax=True),
         None),
        ("DiceCE softmax class weights", lambda: DiceCEPlusLoss(**on, softmax=True, weight=torch.tensor(w)),
         lambda: ML.DiceCELoss(**on, softmax=True, weight=torch.tensor(w)), None),
        ("DiceCE softmax ignore=255", lambda: DiceCEPlusLoss(**on, softmax=True, ignore_index=255), None, 255),
        ("GDL softmax", lambda: GeneralizedDicePlusLoss(**on, softmax=True, normalize_weights=False),
         lambda: ML.GeneralizedDiceLoss(**on, softmax=True), None),
        ("GDL sigmoid", lambda: GeneralizedDicePlusLoss(**on, sigmoid=True, normalize_weights=False),
         lambda: ML.GeneralizedDiceLoss(**on, sigmoid=True), None),
        ("GDL softmax ignore=255", lambda: GeneralizedDicePlusLoss(**on, softmax=True, ignore_index=255), None, 255),
        ("DiceFocal softmax", lambda: DiceFocalPlusLoss(**on, softmax=True),
         lambda: ML.DiceFocalLoss(**on, softmax=True), None),
        ("DiceFocal softmax class weights", lambda: DiceFocalPlusLoss(**on, softmax=True, weight=torch.tensor(w)),
         lambda: ML.DiceFocalLoss(**on, softmax=True, weight=torch.tensor(w)), None),
        ("DiceFocal sigmoid ignore=255", lambda: DiceFocalPlusLoss(**on, sigmoid=True, ignore_index=255), None, 255),
    ]  # fmt: skip


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 where both are 0; inf on a non-finite value)."""
    got, ref = got.detach().double(), ref.detach().double()
    if not (torch.isfinite(got).all() and torch.isfinite(ref).all()):
        return math.inf
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def grad_tolerance(dtype: torch.dtype) -> float:
    """The bound on a gradient's relative deviation: :data:`RTOL`, or the epsilon of a coarser gradient dtype."""
    return max(RTOL, torch.finfo(dtype).eps)


def value_and_grad(loss: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> tuple[torch.Tensor, ...]:
    xi = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _autocast(x.device, amp):
            v = loss(xi, y)
        (g,) = torch.autograd.grad(v, xi)
    return v.detach(), g


@dataclass
class ParityResult:
    name: str
    c: int
    dtype: str
    worst_value: float = 0.0
    worst_grad: float = 0.0
    grad_tol: float = RTOL
    versus: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.worst_value <= RTOL and self.worst_grad <= self.grad_tol

    def line(self) -> str:
        tag = "ok" if self.ok else "FAIL"
        what = self.error or (f"value {self.worst_value:.1e}, grad {self.worst_grad:.1e} "
                              f"(bounds {RTOL:.0e}, {self.grad_tol:.0e})")  # fmt: skip
        versus = "+".join(self.versus)
        return f"[{tag}]   parity C={self.c:<3} {self.dtype:<8} {self.name:<32} triton vs {versus}: {what}"


def parity_one(name, make_ours, make_monai, ignore, c, device, amp, spatial=PARITY_SPATIAL, seed=0) -> ParityResult:
    """Triton path vs torch path (and vs MONAI's class) for one case: float32 logits, or float16 under autocast."""
    dtype = torch.float16 if amp else torch.float32
    res = ParityResult(name, c, "fp16 amp" if amp else "float32", grad_tol=grad_tolerance(dtype))
    g = torch.Generator().manual_seed(seed)
    b, *sp = spatial
    x = (2.0 * torch.randn(b, c, *sp, generator=g)).to(device, dtype)
    y = torch.randint(0, c, (b, 1, *sp), generator=g)
    y[-1][y[-1] == c - 1] = 0  # the last class absent from the last sample
    if ignore is not None:
        y[:, :, 0] = ignore
    y = y.to(device)
    try:
        ours = make_ours().to(device)
        with kernels("triton"):
            v_tri, g_tri = value_and_grad(ours, x, y, amp)
        refs = []
        with kernels("torch"):
            refs.append(("torch", value_and_grad(ours, x, y, amp)))
        if make_monai is not None:  # under AMP: MONAI in float32 on the rounded logits (it rounds inside to fp16)
            monai = make_monai().to(device)
            refs.append(("MONAI" + (" fp32" if amp else ""), value_and_grad(monai, x.float(), y, False)))
        for who, (v_ref, g_ref) in refs:
            res.versus.append(who)
            res.worst_value = max(res.worst_value, relative_error(v_tri, v_ref))
            res.worst_grad = max(res.worst_grad, relative_error(g_tri, g_ref))
    except Exception as e:
        res.error = registry.error_text(e)[:300]
    return res


def check_parity(guard: TimeGuard, device: torch.device, classes: Sequence[int], amps=(False, True),
                 spatial=PARITY_SPATIAL) -> list[ParityResult]:  # fmt: skip
    results = []
    for c, amp in itertools.product(classes, amps):
        for name, ours, ref, ignore in parity_cases(c):
            if not guard.allows(f"parity C={c} {name} amp={amp}"):
                continue
            r = parity_one(name, ours, ref, ignore, c, device, amp, spatial)
            print(r.line(), flush=True)
            results.append(r)
    return results


# ---------------------------------------------------------------------------------------------- training step


def check_training(guard: TimeGuard, quick: bool) -> list[dict]:
    """``gpu_check._sync_free_step`` on the Triton path: eager and compiled, float32 and float16 AMP."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from gpu_check import _sync_free_step

    from monai_gdl_plus import DiceCEPlusLoss, DicePlusLoss, GeneralizedDicePlusLoss

    cases = [
        ("DiceCE softmax ignore=255", lambda: DiceCEPlusLoss(to_onehot_y=True, softmax=True, ignore_index=255), 255),
        ("GDL softmax", lambda: GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True), None),
        ("Dice sigmoid", lambda: DicePlusLoss(to_onehot_y=True, sigmoid=True), None),
    ]
    classes = (16,) if quick else (16, 105)
    # compiling costs ~10 s a case: the first two cases at C=16 only (one in --quick)
    runs = [(case, c, False, amp) for c, case, amp in itertools.product(classes, cases, (False, True))]
    runs += [(case, 16, True, amp) for case, amp in itertools.product(cases[: 1 if quick else 2], (False, True))]
    results = []
    for (name, make, ignore), c, compiled, amp in runs:
        label = f"{name} C={c}" + (" [compiled]" if compiled else "") + (" [amp fp16]" if amp else "")
        if not guard.allows(label):
            continue
        fn = make()
        if compiled:
            fn = torch.compile(fn, fullgraph=True)
        try:
            with kernels("triton"):
                msg, ok = _sync_free_step(fn, (2, c, 32, 32, 32), ignore, amp), True
        except Exception as e:  # a host sync is a RuntimeError; a compile failure may be anything
            msg, ok = registry.error_text(e)[:300], False
        print(f"[{'ok' if ok else 'FAIL'}]   sync-free step (triton): {label}: {msg}", flush=True)
        results.append({"case": label, "ok": ok, "message": msg})
    return results


# --------------------------------------------------------------------------------------------------- timing


class _Autocast(torch.nn.Module):
    """The loss's forward under float16 autocast (backward outside it, as a trainer runs it)."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _autocast(x.device, True):
            return self.loss(x, y)


def floor_ms(logits_bytes: int, bandwidth_gbs: float, multiple: float = FLOOR_L) -> float:
    """Milliseconds to move ``multiple`` x the logits' bytes at ``bandwidth_gbs`` (read + written bytes per second)."""
    return multiple * logits_bytes / (bandwidth_gbs * 1e9) * 1e3 if bandwidth_gbs > 0 else math.nan


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def implementations() -> list[tuple[str, str, str, str]]:
    """(family, registry key, path, row label): per family MONAI's class, then ours on each path."""
    rows = []
    for family, monai_key, ours_key in TIMING_PAIRS:
        rows.append((family, monai_key, "", registry.SPECS[monai_key].label))
        for path in ("triton", "torch"):
            rows.append((family, ours_key, path, f"{registry.SPECS[ours_key].label} [{path}]"))
    return rows


def time_case(key: str, path: str, x: torch.Tensor, y: torch.Tensor, amp: bool, repeats: int) -> dict:
    """Median ms of ``repeats`` timed steps after :data:`WARMUP`, and (on CUDA) the peak allocated above the inputs."""
    device = x.device.type
    loss = registry.build_loss(key).to(x.device)
    if amp:
        loss = _Autocast(loss)
    with kernels(path or "torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(WARMUP):
            timing.step(loss, x, y)
        samples = [timing.time_step(loss, x, y, device)[0] for _ in range(repeats)]
        peak = memory.peak_cuda(loss, x, y) if device == "cuda" else math.nan
    x.grad = None
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "peak_bytes": peak}


def add_ratios(rows: list[dict]) -> None:
    """``time_vs_monai`` against the same family's MONAI row at the same shape and dtype."""
    monai = {(r["shape"], r["dtype"], r["family"]): r["median_ms"] for r in rows if r["path"] == "monai"}
    for r in rows:
        ref = monai.get((r["shape"], r["dtype"], r["family"]), math.nan)
        ok = math.isfinite(ref) and ref > 0 and math.isfinite(r["median_ms"])
        r["time_vs_monai"] = r["median_ms"] / ref if ok else math.nan


def timing_rows(guard: TimeGuard, shapes: Sequence[tuple[int, ...]], repeats: int, bandwidth_gbs: float,
                device: str = "cuda") -> list[dict]:  # fmt: skip
    """Every implementation at each shape, float32 then float16 logits (under autocast), with the ratios (``device``
    other than CUDA: for the tests, without memory)."""
    rows: list[dict] = []
    for shape in shapes:
        if not guard.allows(f"timing {shape_text(shape)} (all losses)"):
            continue
        x32, y = timing.make_inputs(shape, device, seed=0)
        for dtype_name, dtype in DTYPES.items():
            x = x32.detach().to(dtype).requires_grad_(True)
            rows += _timing_rows_at(guard, x, y, dtype_name, repeats, bandwidth_gbs)
            del x
        del x32, y
        if device == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def _timing_rows_at(guard: TimeGuard, x: torch.Tensor, y: torch.Tensor, dtype_name: str, repeats: int,
                    bandwidth_gbs: float) -> list[dict]:  # fmt: skip
    from monai_gdl_plus.functional import kernel_traffic

    rows = []
    shape, dtype = tuple(x.shape), x.dtype
    logits = x.numel() * x.element_size()
    b, c, n = shape[0], shape[1], math.prod(shape[2:])
    for family, key, path, label in implementations():
        if not guard.allows(f"timing {shape_text(shape)} {dtype_name} {label}"):
            continue
        row = {"shape": shape_text(shape), "dtype": dtype_name, "family": family, "loss": key,
               "path": path or "monai", "label": label, "logits_bytes": logits,
               "floor_ms": floor_ms(logits, bandwidth_gbs), "traffic_L": math.nan, "status": "ok"}  # fmt: skip
        if path == "triton":
            row["traffic_L"] = kernel_traffic(b, c, n, dtype, **registry_flags(key)).total_l
        try:
            row.update(time_case(key, path, x, y, dtype_name == "float16", repeats))
        except Exception as e:
            row.update(median_ms=math.nan, min_ms=math.nan, peak_bytes=math.nan, status=registry.error_text(e))
        row["time_vs_floor"] = row["median_ms"] / row["floor_ms"]
        row["peak_L"] = row["peak_bytes"] / logits
        print(f"       {row['shape']} {dtype_name} {label}: {row['median_ms']:.3f} ms, peak {row['peak_L']:.2f} L"
              + ("" if row["status"] == "ok" else f" ({row['status']})"), flush=True)  # fmt: skip
        rows.append(row)
    return rows


def registry_flags(key: str) -> dict:
    """The kernel flags of one of our losses, as ``gdl-plus bench --traffic`` counts them."""
    from monai_gdl_plus.app.bench.traffic import LOSS_FLAGS

    return dict(LOSS_FLAGS[key])


_COLUMNS = (  # header, key, format
    ("shape", "shape", "s"), ("dtype", "dtype", "s"), ("loss", "label", "s"), ("ms", "median_ms", ".3f"),
    ("t/MONAI", "time_vs_monai", ".2f"), ("floor ms", "floor_ms", ".3f"), ("t/floor", "time_vs_floor", ".1f"),
    ("traffic/L", "traffic_L", ".2f"), ("peak/L", "peak_L", ".2f"),
)  # fmt: skip


def _cell(value: object, fmt: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    return format(value, fmt)


def format_table(rows: Sequence[dict], bandwidth_gbs: float) -> str:
    """The timing rows as an aligned text table, a line on the floor, and the rows that failed."""
    cells = [[h for h, _, _ in _COLUMNS]] + [[_cell(r.get(k, math.nan), f) for _, k, f in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"floor = {FLOOR_L:g} L at the measured copy bandwidth {bandwidth_gbs:.0f} GB/s (read + written); "
                 "peak/L: allocated above the inputs during one step, x.grad included; traffic/L: the kernels' count")
    lines += [f"{r['label']} {r['shape']} {r['dtype']}: {r['status']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines)


def target_lines(rows: Sequence[dict]) -> list[str]:
    """The issue's targets for our Triton rows: t/MONAI <= 0.25, t/floor <= 2, peak <= 1.1 L (reported only)."""
    lines = []
    for r in rows:
        if r["path"] != "triton":
            continue
        for key, bound in TARGETS.items():
            v = r.get(key, math.nan)
            verdict = "not measured" if not math.isfinite(v) else ("met" if v <= bound else "MISSED")
            lines.append(f"target {r['label']} {r['shape']} {r['dtype']}: {key} = {_cell(v, '.2f')} "
                         f"(<= {bound:g}): {verdict}")  # fmt: skip
    return lines


def write_outputs(out: Path, report: dict) -> list[Path]:
    """``kernels_timing.csv`` (the timing rows) and ``gpu_kernels.json`` (everything) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = report.get("timing", [])
    csv_path, json_path = out / "kernels_timing.csv", out / "gpu_kernels.json"
    fields = list(dict.fromkeys(k for r in rows for k in r)) or [k for _, k, _ in _COLUMNS]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str, allow_nan=True)
    return [csv_path, json_path]


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="C in {4, 133} for parity, one timing shape, 10 repeats")
    p.add_argument("--out", type=Path, default=Path("gpu_kernels_out"), help="where the CSV and JSON go")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 210; --quick 100)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 100.0 if args.quick else 210.0
    if not args.budget > 0:
        p.error(f"--budget must be positive, got {args.budget}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device (torch.cuda.is_available() is False): the Triton kernels' checks need one;"
              " nothing was checked")  # fmt: skip
        return 2
    import monai

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not importable ({e})"
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, triton {triton_version}, MONAI {monai.__version__} on "
          f"{torch.cuda.get_device_name()}; budget {args.budget:.0f} s{' (quick)' if args.quick else ''}")  # fmt: skip
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton_version,
                    "monai": monai.__version__, "quick": args.quick, "budget_s": args.budget}  # fmt: skip
    t0 = time.monotonic()
    guard = TimeGuard("parity", SHARES["parity"] * args.budget)
    parity = check_parity(guard, dev, QUICK_PARITY_CLASSES if args.quick else PARITY_CLASSES)
    report["parity"] = [dict(vars(r), ok=r.ok) for r in parity]
    report["parity_skipped"] = guard.skipped
    guard = TimeGuard("training steps", SHARES["train"] * args.budget)
    train = check_training(guard, args.quick)
    report["train"], report["train_skipped"] = train, guard.skipped
    guard = TimeGuard("timing", SHARES["timing"] * args.budget)
    bandwidth = timing.measure_floor("cuda", nbytes=2**30)["bandwidth_gbs"]
    print(f"       device-to-device copy: {bandwidth:.0f} GB/s (1 GiB, read + written)")
    shapes = TIMING_SHAPES[:1] if args.quick else TIMING_SHAPES
    rows = timing_rows(guard, shapes, 10 if args.quick else REPEATS, bandwidth)
    report.update(bandwidth_gbs=bandwidth, timing=rows, timing_skipped=guard.skipped)
    print(format_table(rows, bandwidth))
    for line in target_lines(rows):
        print(line)
    report["elapsed_s"] = time.monotonic() - t0
    paths = write_outputs(args.out, report)
    failed = sum(not r.ok for r in parity) + sum(not r["ok"] for r in train)
    print(f"{len(parity)} parity and {len(train)} training-step checks, {failed} failed; "
          f"{report['elapsed_s']:.0f} s; written: {', '.join(map(str, paths))}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
