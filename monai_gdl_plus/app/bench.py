"""Forward+backward time and peak memory of our losses against MONAI's and nnU-Net's, measured in one run.

The method (see ``PERF_NOTES.md``): for each shape, every implementation runs in this process on the same
inputs (float32 logits with ``requires_grad``, an int64 label map (B, 1, *spatial)), ``warmup`` calls each, then
``rounds`` round-robin rounds (the order rotates each round); the figure is the median. A step is
``loss(x, y).backward()`` timed after ``x.grad = None``: it includes allocating ``x.grad``, not freeing the previous
step's (a cost the same for every implementation, which belongs to whoever made that gradient). On Linux a sample
during which any of the process's threads waited for a CPU (run-queue delay in ``/proc/self/task/*/schedstat``) is
repeated, up to :data:`MAX_RETRIES` times (and one repeat per sample on average at most), keeping the
least-disturbed sample.

Peak extra memory on CPU is measured in a fresh subprocess per (loss, shape) with ``MALLOC_MMAP_THRESHOLD_=65536``
(freed blocks go back to the OS): the child builds the inputs, runs one warm-up step, resets the peak RSS
(``echo 5 > /proc/self/clear_refs``), runs one step and reports ``VmHWM`` minus the RSS before that step, ``x.grad``
included. (``ru_maxrss`` is useless there: Linux carries the parent's high-water mark across fork+exec.) On CUDA it
is ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step, in process, and times come from
CUDA events.

Floors: time = reading the logits and writing their gradient once, ``2 L`` bytes at the copy bandwidth measured here
(a large ``Tensor.copy_``; bandwidth counts bytes read plus bytes written); memory = ``1.0 L`` (the gradient itself).
L = bytes of the logits. An exp-throughput figure (two ``exp`` per logit) is reported beside it for CPU.

Use :func:`benchmark` and :func:`format_table` from Python, ``gdl-plus bench`` (through :func:`configure_parser` and
:func:`run`) or ``python -m monai_gdl_plus.app.bench`` from a shell.

Example:
    >>> rows = benchmark([(1, 3, 8, 8, 8)], rounds=1, warmup=0, memory=False, losses=["ours-dice", "monai-dice"])
    >>> print(format_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from monai_gdl_plus.app.memory import advise_huge_pages
from monai_gdl_plus.functional import check_option

__all__ = [
    "DEVICES",
    "LOSSES",
    "benchmark",
    "check_csv_path",
    "configure_parser",
    "format_table",
    "main",
    "measure_first_touch",
    "measure_floor",
    "parse_shape",
    "run",
    "write_csv",
]

DEVICES = ("cpu", "cuda")
LOSSES = (
    "ours-dice", "ours-gdl", "ours-dicece", "ours-dicefocal", "ours-tversky",
    "monai-dice", "monai-gdl", "monai-dicece", "monai-dicefocal", "monai-tversky",
    "nnunet-memeff",
)  # fmt: skip
LOSS_GROUPS = {
    "all": LOSSES,
    "ours": tuple(k for k in LOSSES if k.startswith("ours-")),
    "monai": tuple(k for k in LOSSES if k.startswith("monai-")),
    "nnunet": ("nnunet-memeff",),
    "core": ("ours-dice", "ours-gdl", "ours-dicece", "monai-dice", "monai-gdl", "monai-dicece", "nnunet-memeff"),
}
MAX_RETRIES = 5
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MB = 1e6  # tables report decimal megabytes

# A sample counts as disturbed when its threads waited this long for a CPU (absolute ns, or fraction of the sample).
_WAIT_ABS_NS = 200_000
_WAIT_FRACTION = 0.02
_CHILD_TIMEOUT_S = 900
_BUSY_WAIT_PCT = 10.0  # median wait% from which the table warns that the times are not reliable
_FLOOR_CACHE: dict[tuple[str, int, int], dict[str, float]] = {}


@dataclass(frozen=True)
class _Spec:
    key: str
    label: str
    family: str  # "dice" | "gdl" | "dicece" | "dicefocal" | "tversky"
    owner: str  # "ours" | "monai" | "nnunet"


_SPECS = {
    s.key: s
    for s in (
        _Spec("ours-dice", "DicePlusLoss", "dice", "ours"),
        _Spec("ours-gdl", "GeneralizedDicePlusLoss", "gdl", "ours"),
        _Spec("ours-dicece", "DicePlusLoss(lambda_ce=1)", "dicece", "ours"),
        _Spec("ours-dicefocal", "DiceFocalPlusLoss", "dicefocal", "ours"),
        _Spec("ours-tversky", "TverskyPlusLoss(0.3, 0.7)", "tversky", "ours"),
        _Spec("monai-dice", "MONAI DiceLoss", "dice", "monai"),
        _Spec("monai-gdl", "MONAI GeneralizedDiceLoss", "gdl", "monai"),
        _Spec("monai-dicece", "MONAI DiceCELoss", "dicece", "monai"),
        _Spec("monai-dicefocal", "MONAI DiceFocalLoss", "dicefocal", "monai"),
        _Spec("monai-tversky", "MONAI TverskyLoss(0.3, 0.7)", "tversky", "monai"),
        _Spec("nnunet-memeff", "nnU-Net MemoryEfficientSoftDiceLoss", "dice", "nnunet"),
    )
}


class _Unavailable(Exception):
    """The implementation cannot be imported here (e.g. nnU-Net not installed)."""


def _softmax_dim1(x: torch.Tensor) -> torch.Tensor:
    # nnU-Net's softmax_helper_dim1, written here so its import (and its dependencies) are not needed.
    return torch.softmax(x, 1)


def _make_loss(key: str, compiled: bool = False) -> torch.nn.Module:
    """One implementation, ``torch.compile``d (default inductor backend) with ``compiled``; ours with
    ``fullgraph=True``, the peers as they compile."""
    fn = _build_loss(key)
    return torch.compile(fn, fullgraph=_SPECS[key].owner == "ours") if compiled else fn  # type: ignore[return-value]


def _build_loss(key: str) -> torch.nn.Module:
    """Build one implementation, configured for softmax over logits with an integer label-map target.

    Raises:
        _Unavailable: the implementation's package cannot be imported.
    """
    if key == "ours-dice":
        from monai_gdl_plus import DicePlusLoss

        return DicePlusLoss(to_onehot_y=True, softmax=True)
    if key == "ours-gdl":
        from monai_gdl_plus import GeneralizedDicePlusLoss

        return GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True)
    if key == "ours-dicece":
        from monai_gdl_plus import DicePlusLoss

        return DicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=1.0)
    if key == "ours-dicefocal":
        from monai_gdl_plus import DiceFocalPlusLoss

        return DiceFocalPlusLoss(to_onehot_y=True, softmax=True)
    if key == "ours-tversky":
        from monai_gdl_plus import TverskyPlusLoss

        return TverskyPlusLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)
    if key == "monai-tversky":
        from monai.losses import TverskyLoss

        return TverskyLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)
    if key.startswith("monai-"):
        from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, GeneralizedDiceLoss

        cls = {"monai-dice": DiceLoss, "monai-gdl": GeneralizedDiceLoss, "monai-dicece": DiceCELoss,
               "monai-dicefocal": DiceFocalLoss}[key]  # fmt: skip
        return cls(to_onehot_y=True, softmax=True)
    if key == "nnunet-memeff":
        try:
            from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        except ImportError as e:
            raise _Unavailable(f"not installed ({e})") from None
        except Exception as e:  # an nnU-Net release this code does not know
            raise _Unavailable(f"not importable ({type(e).__name__}: {e})") from None
        # As nnU-Net's trainer builds it for a label map without regions (DC_and_CE_loss): softmax over channels,
        # batch Dice, background dropped, smooth 1e-5; ddp off in a single process. Target: (B, 1, *S) labels.
        return MemoryEfficientSoftDiceLoss(
            apply_nonlin=_softmax_dim1, batch_dice=True, do_bg=False, smooth=1e-5, ddp=False
        )
    raise ValueError(f"`losses` entries must be one of {LOSSES}, got {key!r}.")


def _availability(key: str) -> str:
    """``"ok"`` or why the implementation cannot be built."""
    try:
        _build_loss(key)
    except _Unavailable as e:
        return str(e)
    except Exception as e:
        return _error(e)
    return "ok"


def _error(e: BaseException) -> str:
    text = f"error: {type(e).__name__}: {e}".strip()
    return text.splitlines()[0] if text else "error"


# ---------------------------------------------------------------------------------------------------- arguments


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``"B,C,D,H,W"`` (also ``"BxCxDxHxW"``; 2-D ``"B,C,H,W"`` too) into a tuple of positive ints.

    Args:
        text: the shape as text, or a sequence of ints.

    Returns:
        The shape (B, C, *spatial).

    Raises:
        ValueError: not integers, fewer than 3 dimensions, a size below 1, or fewer than 2 classes.
    """
    if isinstance(text, str):
        parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"`shape` must be comma-separated integers B,C,D,H,W, got {text!r}.") from None
    else:
        shape = tuple(int(s) for s in text)
    if len(shape) < 3 or min(shape) < 1:
        raise ValueError(f"`shape` must be B,C,*spatial with at least one spatial axis and sizes >= 1, got {text!r}.")
    if shape[1] < 2:
        raise ValueError(f"`shape` must have at least 2 classes (C) for a softmax loss, got C={shape[1]} in {text!r}.")
    return shape


def _resolve_losses(losses: Iterable[str] | None) -> list[str]:
    if losses is None:
        return list(LOSSES)
    if isinstance(losses, str):
        losses = [losses]
    keys: list[str] = []
    for entry in losses:
        for name in (n.strip() for n in str(entry).split(",")):
            if not name:
                continue
            name = check_option("losses", name, (*LOSSES, *LOSS_GROUPS))
            for key in LOSS_GROUPS.get(name, (name,)):
                if key not in keys:
                    keys.append(key)
    if not keys:
        raise ValueError(f"`losses` must name at least one of {LOSSES}, got {losses!r}.")
    return [k for k in LOSSES if k in keys]  # fixed order: ours, MONAI, nnU-Net


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


# ---------------------------------------------------------------------------------------------------- measuring


def _sched_wait_ns() -> int | None:
    """Total run-queue wait (ns) of this process's threads so far, or None where schedstat is unavailable."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread may exit between listdir and open
    return total


def _make_inputs(shape: tuple[int, ...], device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g).to(device)
    return x, y


def _step(loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    x.grad = None
    loss_fn(x, y).backward()


def _time_step(
    loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, max_retries: int = MAX_RETRIES
) -> tuple[float, int, float]:
    """One timed step: (milliseconds, repeats caused by CPU contention (at most ``max_retries``), wait fraction).

    The wait fraction is the kept sample's run-queue wait summed over this process's threads, divided by its
    duration (NaN where schedstat is unavailable, and on CUDA).
    """
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x.grad = None
        torch.cuda.synchronize()
        start.record()
        _step(loss_fn, x, y)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)), 0, math.nan
    best_wait, best_ms = math.inf, math.nan
    for attempt in range(max_retries + 1):
        x.grad = None  # freed before the clock starts (``_step`` then finds nothing to free)
        w0 = _sched_wait_ns()
        t0 = time.perf_counter_ns()
        _step(loss_fn, x, y)
        t1 = time.perf_counter_ns()
        w1 = _sched_wait_ns()
        ms = (t1 - t0) / 1e6
        if w0 is None or w1 is None:
            return ms, 0, math.nan
        wait = w1 - w0
        if wait < best_wait:
            best_wait, best_ms = wait, ms
        if wait <= max(_WAIT_ABS_NS, _WAIT_FRACTION * (t1 - t0)):
            return ms, attempt, wait / max(1, t1 - t0)
    return best_ms, max_retries, best_wait / max(1.0, best_ms * 1e6)


def _median_time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` after one untimed call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_floor(device: str = "cpu", nbytes: int = 256 * 2**20, repeats: int = 7) -> dict[str, float]:
    """Measure copy bandwidth (and, on CPU, ``exp`` throughput) with one large float32 tensor.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        nbytes: size of the source tensor (the destination has the same size, preallocated and touched).
        repeats: timed repetitions; the median is used.

    Returns:
        ``{"bandwidth_gbs": bytes read + written per second / 1e9, "exp_ns": nanoseconds per exp element}``.
    """
    n = max(1, nbytes // 4)
    src = torch.empty(n, device=device).uniform_(-3.0, 3.0)
    dst = torch.empty_like(src).zero_()
    t_copy = _median_time(lambda: dst.copy_(src), device, repeats)
    t_exp = _median_time(lambda: torch.exp(src, out=dst), device, repeats)
    return {"bandwidth_gbs": 2 * n * 4 / t_copy / 1e9, "exp_ns": t_exp / n * 1e9}


def measure_first_touch(nbytes: int, repeats: int = 5, huge_pages: bool = False) -> float:
    """Milliseconds the CPU spends making ``nbytes`` of freshly allocated memory usable (page faults and zeroing,
    as the first write to a new tensor pays them): filling a new tensor minus filling a touched one, medians.

    Every implementation pays this at least once per step, for the gradient; on virtual machines it can exceed
    the arithmetic of a whole loss, and it varies with the host's memory state, so it is measured next to the
    losses, per shape. ``huge_pages``: the new tensor gets :func:`~monai_gdl_plus.app.memory.advise_huge_pages` first,
    as the fused loss's buffer does (NaN where that advice cannot be given).
    """
    n = max(1, nbytes // 4)
    warm = torch.empty(n)

    def fresh() -> None:
        t = torch.empty(n)
        if huge_pages:
            advise_huge_pages(t)
        t.fill_(0.0)

    if huge_pages and not advise_huge_pages(warm):
        return math.nan
    t_warm = _median_time(lambda: warm.fill_(0.0), "cpu", repeats)
    t_fresh = _median_time(fresh, "cpu", repeats)
    return max(0.0, t_fresh - t_warm) * 1e3


def _peak_cuda(loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(loss_fn, x, y)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _memory_child(key: str, shape: tuple[int, ...], threads: int, seed: int, compiled: bool = False) -> dict:
    """Runs in the fresh subprocess: peak extra RSS of one forward+backward step (after a warm-up step, which
    also compiles with ``compiled``)."""
    torch.set_num_threads(threads)
    loss_fn = _make_loss(key, compiled)
    x, y = _make_inputs(shape, "cpu", seed)
    _step(loss_fn, x, y)  # warm-up: lazy initialisations stay in the baseline; its big blocks went back to the OS
    x.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base_kb = _read_status_kb("VmHWM")
    _step(loss_fn, x, y)
    peak_kb = _read_status_kb("VmHWM")
    return {
        "loss": key,
        "shape": list(shape),
        "baseline_bytes": base_kb * 1024,
        "peak_extra_bytes": (peak_kb - base_kb) * 1024,
        "logits_bytes": x.numel() * x.element_size(),
    }


def _peak_cpu_subprocess(key: str, shape: tuple[int, ...], threads: int, seed: int, compiled: bool = False) -> int:
    """Spawn ``python -m monai_gdl_plus.app.bench --_memory-case`` with the malloc setting; return peak extra bytes."""
    env = dict(os.environ, **MALLOC_ENV)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable, "-m", "monai_gdl_plus.app.bench", "--_memory-case", key,
        "--shape", ",".join(map(str, shape)), "--threads", str(threads), "--seed", str(seed),
    ] + (["--compile"] if compiled else [])  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory subprocess for {key} {shape} failed (exit {proc.returncode}): {tail}")
    return int(json.loads(lines[-1])["peak_extra_bytes"])


# ---------------------------------------------------------------------------------------------------- benchmark


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def benchmark(
    shapes: Iterable[Sequence[int] | str],
    *,
    rounds: int = 7,
    warmup: int = 2,
    threads: int = 2,
    device: str = "cpu",
    memory: bool = True,
    losses: Iterable[str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    compile: bool = False,
) -> list[dict]:
    """Time forward+backward (and measure peak extra memory) of each loss at each shape, side by side.

    Args:
        shapes: logits shapes (B, C, *spatial), as tuples or ``"B,C,D,H,W"`` strings.
        rounds: round-robin timing rounds (median reported).
        warmup: untimed calls per loss before timing.
        threads: ``torch.set_num_threads`` during the run (restored afterwards; CPU only matters).
        device: ``"cpu"`` or ``"cuda"``.
        memory: also measure peak extra memory (CPU: one subprocess per loss and shape).
        losses: subset of :data:`LOSSES` (or the groups ``"ours"``, ``"monai"``, ``"nnunet"``, ``"core"`` (Dice,
            GDL, Dice+CE and nnU-Net), ``"all"``);
            default all.
        seed: seed of the random logits and labels.
        log: called with a progress line now and then (e.g. ``print`` to stderr); None for silence.
        compile: ``torch.compile`` every implementation (inductor; ours with ``fullgraph=True``); compilation
            happens in the warm-up calls (at least one).

    Returns:
        One dict per (loss, shape), ordered by shape then loss, with keys ``loss``, ``label``, ``family``,
        ``owner``, ``shape`` ("BxCxDxHxW"), ``device``, ``threads``, ``status`` (``"ok"``, ``"not installed (...)"``
        or ``"error: ..."``), ``memory_status`` (``"ok"``, ``"not measured"`` or ``"error: ..."``), ``logits_mb``,
        ``median_ms``, ``min_ms``, ``retried`` (samples repeated for CPU contention), ``wait_pct`` (median over the
        kept samples of the threads' summed run-queue wait as a percentage of the sample's time; NaN on CUDA),
        ``peak_mb``, ``peak_L`` (peak
        extra / logits bytes), ``time_vs_monai``, ``mem_vs_monai``
        (against the MONAI counterpart of the same family; nnU-Net against MONAI DiceLoss), ``time_vs_nnunet``,
        ``mem_vs_nnunet``, ``bandwidth_gbs``, ``floor_ms`` (2 L at that bandwidth), ``exp_floor_ms`` (two exp per
        logit, NaN on CUDA), ``time_vs_floor`` and ``mem_vs_floor`` (= ``peak_L``, the floor being 1.0 L).
        Missing figures are NaN.

    Raises:
        ValueError: a bad shape, count, device, loss name, or ``device="cuda"`` without CUDA.
        TypeError: a count that is not an int.
    """
    shape_list = [parse_shape(s) for s in shapes]
    if not shape_list:
        raise ValueError("`shapes` must hold at least one shape B,C,*spatial, got none.")
    _check_int("rounds", rounds, 1)
    _check_int("warmup", warmup, 0)
    _check_int("threads", threads, 1)
    device = check_option("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but torch.cuda.is_available() is False here.")
    keys = _resolve_losses(losses)
    say = log or (lambda _msg: None)
    warmup = max(warmup, 1) if compile else warmup

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        biggest = max(math.prod(s) * 4 for s in shape_list)
        # Big enough to leave the caches (a GPU's L2 included), small enough for a shared machine.
        nbytes = 2**30 if device == "cuda" else int(min(max(4 * biggest, 64 * 2**20), 256 * 2**20))
        floor_key = (device, nbytes, threads)
        if floor_key not in _FLOOR_CACHE:  # the machine's bandwidth: measured once per process
            _FLOOR_CACHE[floor_key] = measure_floor(device, nbytes=nbytes)
        floor = _FLOOR_CACHE[floor_key]
        exp = f", exp {floor['exp_ns']:.2f} ns/element" if device == "cpu" else ""
        say(f"copy bandwidth {floor['bandwidth_gbs']:.1f} GB/s{exp}")
        status = {k: _availability(k) for k in keys}
        rows: list[dict] = []
        for shape in shape_list:
            rows.extend(
                _bench_shape(shape, keys, status, rounds, warmup, threads, device, memory, seed, floor, say, compile)
            )
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _bench_shape(
    shape, keys, status, rounds, warmup, threads, device, memory, seed, floor, say, compiled=False
) -> list[dict]:
    logits_bytes = math.prod(shape) * 4
    shape_txt = "x".join(map(str, shape))
    tag = " [compiled]" if compiled else ""
    rows = {
        k: {
            "loss": k, "label": _SPECS[k].label + tag, "family": _SPECS[k].family, "owner": _SPECS[k].owner,
            "shape": shape_txt, "device": device, "threads": threads, "status": status[k],
            "logits_mb": logits_bytes / MB, "median_ms": math.nan, "min_ms": math.nan, "retried": 0,
            "wait_pct": math.nan,
            "peak_mb": math.nan, "peak_L": math.nan, "memory_status": "ok" if memory else "not measured",
        }  # fmt: skip
        for k in keys
    }
    x, y = _make_inputs(shape, device, seed)
    first_touch_ms = measure_first_touch(logits_bytes) if device == "cpu" else math.nan
    huge_touch_ms = measure_first_touch(logits_bytes, huge_pages=True) if device == "cpu" else math.nan
    fns: dict[str, torch.nn.Module] = {}
    for k in keys:
        if status[k] != "ok":
            continue
        try:
            fn = _make_loss(k, compiled).to(device)
            for _ in range(warmup):
                _step(fn, x, y)
            fns[k] = fn
        except Exception as e:  # a broken implementation must not hide the others' figures
            rows[k]["status"] = _error(e)
    say(f"timing {shape_txt}: {len(fns)} losses x {rounds} rounds")
    times: dict[str, list[float]] = {k: [] for k in fns}
    waits: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    # On a machine that is busy all the time every sample would be repeated: cap the repeats at one per sample on
    # average, so contention costs at most about twice the time.
    budget = rounds * len(order)
    for r in range(rounds):
        shift = r % len(order) if order else 0
        for k in order[shift:] + order[:shift]:
            try:
                ms, retried, wait = _time_step(fns[k], x, y, device, min(MAX_RETRIES, budget))
            except Exception as e:
                rows[k]["status"] = _error(e)
                order.remove(k)
                continue
            times[k].append(ms)
            waits[k].append(wait)
            rows[k]["retried"] += retried
            budget -= retried
    for k in fns:
        if times[k] and rows[k]["status"] == "ok":
            rows[k]["median_ms"] = statistics.median(times[k])
            rows[k]["min_ms"] = min(times[k])
            rows[k]["wait_pct"] = 100 * statistics.median(waits[k])
    if memory and device == "cuda":
        for k, fn in fns.items():
            if rows[k]["status"] == "ok":
                try:
                    rows[k]["peak_mb"] = _peak_cuda(fn, x, y) / MB
                except Exception as e:
                    rows[k]["memory_status"] = _error(e)
    x.grad = None
    del x, y, fns
    gc.collect()
    if memory and device == "cpu":
        for k in keys:
            if rows[k]["status"] != "ok":
                continue
            say(f"memory {shape_txt}: {k} (fresh subprocess)")
            try:
                rows[k]["peak_mb"] = _peak_cpu_subprocess(k, shape, threads, seed, compiled) / MB
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                rows[k]["memory_status"] = _error(e)
    floor_ms = 2 * logits_bytes / (floor["bandwidth_gbs"] * 1e9) * 1e3
    exp_floor_ms = 2 * math.prod(shape) * floor["exp_ns"] / 1e6 if device == "cpu" else math.nan
    for k, row in rows.items():
        if row["status"] != "ok":
            row["memory_status"] = "not measured"
        row["peak_L"] = row["peak_mb"] * MB / logits_bytes
        row["bandwidth_gbs"] = floor["bandwidth_gbs"]
        row["floor_ms"] = floor_ms
        row["exp_floor_ms"] = exp_floor_ms
        row["first_touch_ms"] = first_touch_ms
        row["first_touch_huge_ms"] = huge_touch_ms
        row["time_vs_floor"] = _ratio(row["median_ms"], floor_ms)
        row["mem_vs_floor"] = row["peak_L"]
        spec = _SPECS[k]
        monai = rows.get("monai-" + ("dice" if spec.owner == "nnunet" else spec.family))
        nnunet = rows.get("nnunet-memeff")
        for what, col in (("time", "median_ms"), ("mem", "peak_mb")):
            row[f"{what}_vs_monai"] = _ratio(row[col], monai[col]) if monai else math.nan
            row[f"{what}_vs_nnunet"] = _ratio(row[col], nnunet[col]) if nnunet else math.nan
    return list(rows.values())


# ---------------------------------------------------------------------------------------------------- output


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:{spec}}{suffix}"


_COLUMNS = (
    ("loss", "label", None, "<"),
    ("shape", "shape", None, "<"),
    ("ms", "median_ms", ".1f", ">"),
    ("retried", "retried", "d", ">"),
    ("wait%", "wait_pct", ".0f", ">"),
    ("peak MB", "peak_mb", ".1f", ">"),
    ("xL", "peak_L", ".2f", ">"),
    ("t/MONAI", "time_vs_monai", ".2f", ">"),
    ("m/MONAI", "mem_vs_monai", ".2f", ">"),
    ("t/nnU-Net", "time_vs_nnunet", ".2f", ">"),
    ("m/nnU-Net", "mem_vs_nnunet", ".2f", ">"),
    ("t/floor", "time_vs_floor", ".1f", ">"),
)


def format_table(rows: Sequence[dict]) -> str:
    """Render :func:`benchmark` rows as a text table, followed by the floor figures per shape.

    Columns: median ms, samples repeated for CPU contention, the share of a sample's time its threads waited for a
    CPU (wait%), peak extra MB, peak extra in logits' bytes (xL), time and memory as multiples of the MONAI
    counterpart and of nnU-Net's loss, time as a multiple of the copy floor.
    Unavailable or failed implementations get one line saying why.

    Args:
        rows: what :func:`benchmark` returned.

    Returns:
        The table as one string (no trailing newline).
    """
    ok = [r for r in rows if r["status"] == "ok"]
    cells = [[h for h, *_ in _COLUMNS]]
    for r in ok:
        cells.append([r[k] if spec is None else _fmt(r[k], spec) for _, k, spec, _a in _COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]

    def line(c: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, w, (_h, _k, _s, a) in zip(c, widths, _COLUMNS)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    prev_shape = None
    for r, c in zip(ok, cells[1:]):
        if prev_shape is not None and r["shape"] != prev_shape:
            out.append("")
        prev_shape = r["shape"]
        out.append(line(c))
    skipped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            skipped.setdefault((r["label"], r["status"]), []).append(r["shape"])
    for r in ok:
        if r["memory_status"].startswith("error"):
            skipped.setdefault((r["label"], "memory " + r["memory_status"]), []).append(r["shape"])
    for (label, why), shapes in skipped.items():
        out.append(f"{label}: {why} [{', '.join(shapes)}]")
    if rows:
        r0 = rows[0]
        out.append("")
        notes = (
            f"device {r0['device']}, {r0['threads']} threads. t = median forward+backward time, m = peak extra memory "
            "(x.grad included), each as a multiple of the MONAI counterpart (nnU-Net's: of MONAI DiceLoss) or of "
            "nnU-Net's loss; xL = peak extra / logits' bytes (L). retried = samples repeated because a thread waited "
            "for a CPU; wait% = median run-queue wait of the threads over a sample's time (large: the machine is "
            "busy and times measure contention as much as the loss).",
            "Floors: time = reading the logits and writing their gradient once (2 L) at the copy bandwidth measured "
            f"here, {r0['bandwidth_gbs']:.1f} GB/s (t/floor = time / that); memory = 1.0 L, the gradient (xL is the "
            "distance from it). First touch = what making L bytes of new memory usable cost just before the shape "
            "was timed (page faults); every implementation pays it at least once, for the gradient (ours asks for "
            "huge pages for it on Linux: the figure in parentheses; MONAI_GDL_PLUS_HUGE_PAGES=0 turns that off).",
        )
        out.extend(textwrap.fill(note, width=110) for note in notes)
        busy: dict[str, float] = {}
        for r in ok:
            if isinstance(r.get("wait_pct"), float) and r["wait_pct"] >= _BUSY_WAIT_PCT:
                busy[r["shape"]] = max(busy.get(r["shape"], 0.0), r["wait_pct"])
        for shape, pct in busy.items():
            out.append(
                f"WARNING {shape}: threads waited for a CPU during up to {pct:.0f}% of a sample; these times measure "
                "the machine's load as much as the losses: rerun on a quiet machine."
            )
        seen: list[str] = []
        for r in rows:
            if r["shape"] in seen:
                continue
            seen.append(r["shape"])
            exp = "" if not math.isfinite(r["exp_floor_ms"]) else f"; two exp per logit take {r['exp_floor_ms']:.2f} ms"
            touch = r.get("first_touch_ms", math.nan)
            huge = r.get("first_touch_huge_ms", math.nan)
            huge = "" if not math.isfinite(huge) else f" ({huge:.1f} ms on huge pages, as our fused buffer)"
            touch = "" if not math.isfinite(touch) else f"; first touch of L fresh bytes {touch:.1f} ms{huge}"
            out.append(
                f"  {r['shape']}: L = {r['logits_mb']:.1f} MB; time floor {r['floor_ms']:.2f} ms{exp}{touch}; "
                f"memory floor {r['logits_mb']:.1f} MB"
            )
    return "\n".join(out)


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Save :func:`benchmark` rows as CSV (one row per loss and shape, every key a column)."""
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def check_csv_path(path: str | os.PathLike | None) -> None:
    """Raise ValueError naming ``--csv`` if ``path`` cannot be a new file: checked before minutes of measuring."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"`--csv` {str(path)!r} is a folder; give a file name.")
    if not os.path.isdir(folder):
        raise ValueError(f"`--csv` {str(path)!r}: folder {folder!r} does not exist.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"`--csv` {str(path)!r}: folder {folder!r} is not writable.")


# ---------------------------------------------------------------------------------------------------- CLI


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (used by ``gdl-plus bench`` and ``python -m monai_gdl_plus.app.bench``).

    Args:
        parser: the (sub)parser to fill.
    """
    parser.add_argument(
        "--shape", dest="shapes", type=_shape_arg, nargs="+", action="extend", metavar="B,C,D,H,W",
        help="logits shape; repeat the option or give several (default: 2,16,64,64,64)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7, help="round-robin timing rounds, median reported (7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per loss before timing (2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    parser.add_argument(
        "--losses", nargs="+", action="extend", metavar="NAME",
        help=f"subset (comma or space separated) of {', '.join(LOSSES)}, or ours / monai / nnunet / core / all",
    )  # fmt: skip
    parser.add_argument("--csv", metavar="PATH", help="also save the rows as CSV")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every implementation (inductor; compiled in the warm-up)"
    )
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments, print the table; 0 on success, 1 if a loss failed, 2 on bad input.

    Args:
        args: a namespace from a parser filled by :func:`configure_parser`.

    Returns:
        The exit status.
    """
    shapes = getattr(args, "shapes", None) or [(2, 16, 64, 64, 64)]
    try:
        check_csv_path(args.csv)
        rows = benchmark(
            shapes, rounds=args.rounds, warmup=args.warmup, threads=args.threads, device=args.device,
            memory=args.memory, losses=args.losses, seed=getattr(args, "seed", 0),
            log=lambda m: print(m, file=sys.stderr, flush=True), compile=getattr(args, "compile", False),
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        print(f"gdl-plus bench: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.csv:
        try:
            write_csv(rows, args.csv)
        except OSError as e:
            print(f"gdl-plus bench: error: cannot write `--csv` {args.csv!r}: {e}", file=sys.stderr)
            return 2
        print(f"rows saved to {args.csv}")
    return 1 if any(r["status"].startswith("error") or r["memory_status"].startswith("error") for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_gdl_plus.app.bench [options]``; also the private memory-child entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_memory-case" in argv:
        child = argparse.ArgumentParser(prog="monai_gdl_plus.app.bench --_memory-case")
        child.add_argument("--_memory-case", dest="key", choices=LOSSES, required=True)
        child.add_argument("--shape", type=_shape_arg, required=True)
        child.add_argument("--threads", type=int, default=2)
        child.add_argument("--seed", type=int, default=0)
        child.add_argument("--compile", action="store_true")
        a = child.parse_args(argv)
        print(json.dumps(_memory_child(a.key, a.shape, a.threads, a.seed, a.compile)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m monai_gdl_plus.app.bench", description=__doc__.split("\n")[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
