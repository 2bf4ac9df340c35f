"""What one allocator setting's child measures, in its own process: for each shape, every implementation on the same
inputs (float32 logits with ``requires_grad``, an int64 label map (B, 1, *spatial)), ``warmup`` calls each, then
``rounds`` round-robin rounds (the order rotates each round); the figure is the median. On a machine busy all the time
every sample would be repeated, so the repeats are capped at one per sample on average.

Floors: time = reading the logits and writing their gradient once, ``2 L`` bytes at the copy bandwidth measured in
this process (:func:`~monai_gdl_plus.app.bench.timing.measure_floor`), memory = ``1.0 L`` (the gradient itself),
L = bytes of the logits.

Examples:
    >>> spec = RunSpec(shapes=((1, 3, 8, 8, 8),), losses=("ours-dice",), rounds=1, warmup=0, threads=1,
    ...                device="cpu", memory=False, seed=0, compile=False)
    >>> RunSpec.from_json(spec.to_json()) == spec
    True
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from monai_gdl_plus.app.bench import children, memory, probes, registry, timing

__all__ = ["MB", "RunSpec", "bench_shape", "measure", "new_row"]

MB = 1e6  # tables report decimal megabytes
_FLOOR_CACHE: dict[tuple[str, int, int], dict[str, float]] = {}  # the machine's bandwidth: measured once a process


@dataclass(frozen=True)
class RunSpec:
    """What one allocator setting's child measures (everything ``benchmark`` was given, validated)."""

    shapes: tuple[tuple[int, ...], ...]
    losses: tuple[str, ...]
    rounds: int
    warmup: int
    threads: int
    device: str
    memory: bool
    seed: int
    compile: bool

    def to_json(self) -> str:
        """The spec as the JSON text a child receives on its command line."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """The spec :meth:`to_json` wrote."""
        d = json.loads(text)
        return cls(**{**d, "shapes": tuple(tuple(s) for s in d["shapes"]), "losses": tuple(d["losses"])})


def new_row(key: str, shape: tuple[int, ...], spec: RunSpec, allocator: str, status: str) -> dict:
    """A row with every figure NaN (filled in as they are measured)."""
    nan, info = math.nan, registry.SPECS[key]
    return {
        "loss": key, "label": info.label + (" [compiled]" if spec.compile else ""),
        "family": info.family, "owner": info.owner, "allocator": allocator,
        "thp_env": os.environ.get(children.THP_ENV), "kernel_thp": probes.kernel_thp_mode(),
        "shape": "x".join(map(str, shape)), "device": spec.device, "threads": spec.threads, "status": status,
        "logits_mb": math.prod(shape) * 4 / MB,
        "median_ms": nan, "min_ms": nan, "retried": 0, "wait_pct": nan, "peak_mb": nan, "peak_L": nan,
        "memory_status": "ok" if spec.memory and status == "ok" else "not measured",
        "bandwidth_gbs": nan, "floor_ms": nan, "exp_floor_ms": nan, "first_touch_ms": nan, "fresh_huge_pct": nan,
    }  # fmt: skip


def measure(spec: RunSpec, allocator: str, say: Callable[[str], None]) -> list[dict]:
    """Everything in ``spec``, in this process, as it is: what a setting's child runs (``allocator`` only labels the
    rows and goes on to the memory children). Ratios are left to the report."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        floor = _floor(spec)
        exp = f", exp {floor['exp_ns']:.2f} ns/element" if spec.device == "cpu" else ""
        say(f"copy bandwidth {floor['bandwidth_gbs']:.1f} GB/s{exp}")
        status = {k: registry.availability(k) for k in spec.losses}
        rows: list[dict] = []
        for shape in spec.shapes:
            rows.extend(bench_shape(shape, spec, allocator, status, floor, say))
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _floor(spec: RunSpec) -> dict[str, float]:
    biggest = max(math.prod(s) * 4 for s in spec.shapes)
    # Big enough to leave the caches (a GPU's L2 included), small enough for a shared machine.
    nbytes = 2**30 if spec.device == "cuda" else int(min(max(4 * biggest, 64 * 2**20), 256 * 2**20))
    key = (spec.device, nbytes, spec.threads)
    if key not in _FLOOR_CACHE:
        _FLOOR_CACHE[key] = timing.measure_floor(spec.device, nbytes=nbytes)
    return _FLOOR_CACHE[key]


def bench_shape(
    shape: tuple[int, ...], spec: RunSpec, allocator: str, status: dict[str, str], floor: dict[str, float],
    say: Callable[[str], None],
) -> list[dict]:  # fmt: skip
    """The rows of one shape: warm-up, round-robin timing, peak memory, floors."""
    rows = {k: new_row(k, shape, spec, allocator, status[k]) for k in spec.losses}
    x, y = timing.make_inputs(shape, spec.device, spec.seed)
    logits_bytes = math.prod(shape) * 4
    on_cpu = spec.device == "cpu"
    first_touch_ms = timing.measure_first_touch(logits_bytes) if on_cpu else math.nan
    huge_share = probes.huge_page_share(logits_bytes) if on_cpu else math.nan
    fns = _warm_up(spec, rows, x, y)
    say(f"timing {'x'.join(map(str, shape))}: {len(fns)} losses x {spec.rounds} rounds")
    _time_round_robin(fns, spec, rows, x, y)
    if spec.memory and not on_cpu:
        _cuda_peaks(fns, rows, x, y)
    x.grad = None
    del x, y, fns
    gc.collect()
    if spec.memory and on_cpu:
        _cpu_peaks(shape, spec, allocator, rows, say)
    for row in rows.values():
        if row["status"] != "ok":
            row["memory_status"] = "not measured"
        row.update(_floors(shape, spec.device, floor), first_touch_ms=first_touch_ms, fresh_huge_pct=100 * huge_share)
    return list(rows.values())


def _floors(shape: tuple[int, ...], device: str, floor: dict[str, float]) -> dict[str, float]:
    """The floor figures of a row: the bandwidth, 2 L at it (ms), and two exp per logit (ms; NaN on CUDA)."""
    return {
        "bandwidth_gbs": floor["bandwidth_gbs"],
        "floor_ms": 2 * math.prod(shape) * 4 / (floor["bandwidth_gbs"] * 1e9) * 1e3,
        "exp_floor_ms": 2 * math.prod(shape) * floor["exp_ns"] / 1e6 if device == "cpu" else math.nan,
    }


def _warm_up(spec: RunSpec, rows: dict[str, dict], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.nn.Module]:
    """The implementations that built and survived ``spec.warmup`` steps; a failure is its row's status."""
    fns: dict[str, torch.nn.Module] = {}
    for k, row in rows.items():
        if row["status"] != "ok":
            continue
        try:
            fn = registry.make_loss(k, spec.compile).to(spec.device)
            for _ in range(spec.warmup):
                timing.step(fn, x, y)
            fns[k] = fn
        except Exception as e:  # a broken implementation must not hide the others' figures
            row["status"] = registry.error_text(e)
    return fns


def _time_round_robin(
    fns: dict[str, torch.nn.Module], spec: RunSpec, rows: dict[str, dict], x: torch.Tensor, y: torch.Tensor
) -> None:
    times: dict[str, list[float]] = {k: [] for k in fns}
    waits: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    budget = spec.rounds * len(order)  # repeats for contention: one per sample on average at most
    for r in range(spec.rounds):
        shift = r % len(order) if order else 0
        for k in order[shift:] + order[:shift]:
            try:
                ms, retried, wait = timing.time_step(fns[k], x, y, spec.device, min(timing.MAX_RETRIES, budget))
            except Exception as e:
                rows[k]["status"] = registry.error_text(e)
                order.remove(k)
                continue
            times[k].append(ms)
            waits[k].append(wait)
            rows[k]["retried"] += retried
            budget -= retried
    for k in fns:
        if times[k] and rows[k]["status"] == "ok":
            rows[k].update(median_ms=statistics.median(times[k]), min_ms=min(times[k]),
                           wait_pct=100 * statistics.median(waits[k]))  # fmt: skip


def _cuda_peaks(fns: dict[str, torch.nn.Module], rows: dict[str, dict], x: torch.Tensor, y: torch.Tensor) -> None:
    for k, fn in fns.items():
        if rows[k]["status"] == "ok":
            try:
                rows[k]["peak_mb"] = memory.peak_cuda(fn, x, y) / MB
            except Exception as e:
                rows[k]["memory_status"] = registry.error_text(e)


def _cpu_peaks(
    shape: tuple[int, ...], spec: RunSpec, allocator: str, rows: dict[str, dict], say: Callable[[str], None]
) -> None:
    for k, row in rows.items():
        if row["status"] != "ok":
            continue
        say(f"memory {row['shape']}: {k} (fresh subprocess)")
        try:
            peak = memory.peak_cpu_subprocess(k, shape, spec.threads, spec.seed, spec.compile, allocator)
            row["peak_mb"] = peak / MB
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            row["memory_status"] = registry.error_text(e)
