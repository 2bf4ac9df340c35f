"""Forward+backward time and peak memory of our losses against MONAI's and nnU-Net's, under each allocator setting.

Allocator settings (:data:`ALLOCATORS`): on CPU how fast a loss runs depends on how the process gets fresh memory,
and that is a property of the process, not of a loss. Every setting is therefore applied to every implementation
alike, in its own child process (``python -m monai_gdl_plus.app.bench`` with a private flag, which sends its rows
back as JSON), started with exactly that environment:

- ``default``: ``THP_MEM_ALLOC_ENABLE`` removed from the child's environment, whatever the caller's shell has:
  PyTorch's CPU allocator as shipped. Large tensors come from fresh ``mmap``s mapped 4 KiB at a time on their first
  write (unless the kernel's THP mode is ``always``), so every fresh logits-sized temporary costs page faults.
- ``thp``: ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's own switch: c10's CPU allocator page-aligns every allocation of
  2 MiB or more and ``madvise(MADV_HUGEPAGE)``s it, so the kernel backs it with 2 MiB pages (where its THP mode is
  ``madvise`` or ``always``), far fewer faults. c10 reads the variable once, at the process's first CPU allocation,
  and caches it: it has to be in the environment before the process starts, hence the child processes.

Ratios (``t/MONAI`` etc.) compare implementations within one setting, never across settings. On CUDA the setting
does not concern the measured tensors: only ``default`` runs there.

The method (see ``PERF_NOTES.md``), within one setting's child: for each shape, every implementation runs in that
process on the same inputs (float32 logits with ``requires_grad``, an int64 label map (B, 1, *spatial)), ``warmup``
calls each, then ``rounds`` round-robin rounds (the order rotates each round); the figure is the median. A step is
``loss(x, y).backward()`` timed after ``x.grad = None``: it includes allocating ``x.grad``, not freeing the previous
step's (a cost the same for every implementation, which belongs to whoever made that gradient). On Linux a sample
during which any of the process's threads waited for a CPU (run-queue delay in ``/proc/self/task/*/schedstat``) is
repeated, up to :data:`MAX_RETRIES` times (and one repeat per sample on average at most), keeping the
least-disturbed sample.

Peak extra memory on CPU is measured in a fresh subprocess per (loss, shape) with the same allocator setting and
``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks go back to the OS): the child builds the inputs, runs one warm-up
step, resets the peak RSS (``echo 5 > /proc/self/clear_refs``), runs one step and reports ``VmHWM`` minus the RSS
before that step, ``x.grad`` included. (``ru_maxrss`` is useless there: Linux carries the parent's high-water mark
across fork+exec.) On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step, in
process, and times come from CUDA events.

Floors: time = reading the logits and writing their gradient once, ``2 L`` bytes at the copy bandwidth measured here
(a large ``Tensor.copy_``; bandwidth counts bytes read plus bytes written); memory = ``1.0 L`` (the gradient itself).
L = bytes of the logits. An exp-throughput figure (two ``exp`` per logit) is reported beside it for CPU, and so is
the first touch of L fresh bytes under the setting (:func:`measure_first_touch`), with the share of such a fresh
tensor that the kernel put on huge pages (how one can tell that the ``thp`` setting took effect).

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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from monai_gdl_plus.app.common import check_int, fmt
from monai_gdl_plus.options import check_option

__all__ = [
    "ALLOCATORS",
    "DEVICES",
    "LOSSES",
    "THP_ENV",
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
ALLOCATORS = ("default", "thp")
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch: huge pages for CPU allocations of 2 MiB or more
# What each allocator setting puts in a child's environment (THP_ENV itself is always removed first).
_ALLOCATOR_ENV: dict[str, dict[str, str]] = {"default": {}, "thp": {THP_ENV: "1"}}
_ALLOCATOR_TEXT = {
    "default": f"{THP_ENV} unset (PyTorch's CPU allocator as shipped)",
    "thp": f"{THP_ENV}=1 for every implementation (CPU allocations of 2 MiB or more advised onto huge pages)",
}
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
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
_CHILD_TIMEOUT_S = 900  # one memory child; a timing child (a whole setting) has no limit
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


def _resolve_allocators(allocators: Iterable[str] | None, device: str) -> list[str]:
    """The allocator settings to run, in :data:`ALLOCATORS` order: all of them on CPU by default, ``default`` only on
    CUDA (``THP_MEM_ALLOC_ENABLE`` concerns CPU tensors, not the ones measured there)."""
    if allocators is None:
        return list(ALLOCATORS) if device == "cpu" else ["default"]
    if isinstance(allocators, str):
        allocators = [allocators]
    names: list[str] = []
    for entry in allocators:
        names.extend(check_option("allocators", n.strip(), ALLOCATORS) for n in str(entry).split(",") if n.strip())
    if not names:
        raise ValueError(f"`allocators` must name at least one of {ALLOCATORS}, got {allocators!r}.")
    if device != "cpu" and "thp" in names:
        raise ValueError(
            f"`allocators` 'thp' sets PyTorch's CPU allocator ({THP_ENV}=1) and does not apply to device "
            f"{device!r}; use 'default' there, got {names!r}."
        )
    return [a for a in ALLOCATORS if a in names]


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


def measure_first_touch(nbytes: int, repeats: int = 5) -> float:
    """Milliseconds the CPU spends making ``nbytes`` of freshly allocated memory usable (page faults and zeroing,
    as the first write to a new tensor pays them): filling a new tensor minus filling a touched one, medians.

    Every implementation pays this at least once per step, for the gradient; on virtual machines it can exceed
    the arithmetic of a whole loss, and it varies with the host's memory state, so it is measured next to the
    losses, per shape. It is measured under this process's own allocator setting: in a ``thp`` child of
    :func:`benchmark` (``THP_MEM_ALLOC_ENABLE=1``) the new tensor is on huge pages where the kernel allows.
    """
    n = max(1, nbytes // 4)
    warm = torch.empty(n)
    t_warm = _median_time(lambda: warm.fill_(0.0), "cpu", repeats)
    t_fresh = _median_time(lambda: torch.empty(n).fill_(0.0), "cpu", repeats)
    return max(0.0, t_fresh - t_warm) * 1e3


def _kernel_thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), or ``"n/a"`` without one."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return "n/a"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text and "]" in text else "n/a"


def _anon_huge_kb(address: int) -> int | None:
    """AnonHugePages (kB) of the mapping that holds ``address`` (``/proc/self/smaps``), None where unreadable."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _huge_page_share(nbytes: int) -> float:
    """Share (0-1) of a fresh ``nbytes`` CPU tensor that sits on huge pages right after its first write, under this
    process's allocator setting; NaN where ``/proc/self/smaps`` cannot tell. (The mapping holding it is read, so a
    tensor under glibc's mmap threshold, sharing the heap, can read high: meant for logits-sized tensors.)"""
    t = torch.empty(max(1, nbytes // 4))
    t.fill_(0.0)
    nbytes = t.numel() * t.element_size()
    kb = _anon_huge_kb(t.data_ptr() + nbytes // 2)
    return math.nan if kb is None else min(1.0, kb * 1024 / nbytes)


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
        "thp_env": os.environ.get(THP_ENV),
    }


def _child_env(allocator: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child under ``allocator``: ``THP_MEM_ALLOC_ENABLE`` exactly as the setting
    says (removed for ``default``, even when this process has it), then ``extra``, and this package importable."""
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    env.update(_ALLOCATOR_ENV[allocator])
    env.update(extra or {})
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    return env


def _run_child(
    argv: Sequence[str],
    allocator: str,
    what: str,
    *,
    extra_env: dict[str, str] | None = None,
    timeout: float | None = None,
    relay: Callable[[str], None] | None = None,
) -> dict:
    """Run ``python -m monai_gdl_plus.app.bench *argv`` under ``allocator`` and return the JSON object on the last
    line of its standard output. ``relay`` receives its standard error line by line as it comes (progress).

    Raises:
        RuntimeError: the child failed or printed no result (the message names ``what`` and ends with the last line
            of its standard error).
        subprocess.TimeoutExpired: it ran past ``timeout`` seconds (it is killed).
    """
    cmd = [sys.executable, "-m", "monai_gdl_plus.app.bench", *argv]
    proc = subprocess.Popen(
        cmd, env=_child_env(allocator, extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    err: list[str] = []

    def drain(stream: Iterable[str], sink: list[str], forward: Callable[[str], None] | None) -> None:
        for line in stream:
            sink.append(line)
            if forward is not None:
                forward(line.rstrip("\n"))

    # both pipes drained at once: a child blocked on a full pipe would never exit
    readers = [
        threading.Thread(target=drain, args=(proc.stdout, out, None), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, err, relay), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        for reader in readers:
            reader.join()
    lines = "".join(out).strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = ([line.strip() for line in err if line.strip()] or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def _peak_cpu_subprocess(
    key: str, shape: tuple[int, ...], threads: int, seed: int, compiled: bool = False, allocator: str = "default"
) -> int:
    """Peak extra bytes of one step of ``key`` at ``shape``, from a fresh ``--_memory-case`` child under
    ``allocator`` and the malloc setting."""
    argv = [
        "--_memory-case", key, "--shape", ",".join(map(str, shape)), "--threads", str(threads), "--seed", str(seed),
    ] + (["--compile"] if compiled else [])  # fmt: skip
    result = _run_child(
        argv, allocator, f"memory subprocess for {key} {shape}", extra_env=MALLOC_ENV, timeout=_CHILD_TIMEOUT_S
    )
    return int(result["peak_extra_bytes"])


# ---------------------------------------------------------------------------------------------------- benchmark


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


@dataclass(frozen=True)
class _Run:
    """What one allocator setting's child measures (everything :func:`benchmark` was given, validated)."""

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
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> _Run:
        d = json.loads(text)
        return cls(**{**d, "shapes": tuple(tuple(s) for s in d["shapes"]), "losses": tuple(d["losses"])})


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
    allocators: Iterable[str] | None = None,
) -> list[dict]:
    """Time forward+backward (and measure peak extra memory) of each loss at each shape, side by side, under each
    allocator setting.

    Each setting runs in its own child process started with that setting's environment (see the module's
    docstring); all implementations are timed there together, round-robin, and ratios compare rows of the same
    setting and shape.

    Args:
        shapes: logits shapes (B, C, *spatial), as tuples or ``"B,C,D,H,W"`` strings.
        rounds: round-robin timing rounds (median reported).
        warmup: untimed calls per loss before timing.
        threads: ``torch.set_num_threads`` in the children (CPU only matters).
        device: ``"cpu"`` or ``"cuda"``.
        memory: also measure peak extra memory (CPU: one subprocess per loss and shape, under the same setting).
        losses: subset of :data:`LOSSES` (or the groups ``"ours"``, ``"monai"``, ``"nnunet"``, ``"core"`` (Dice,
            GDL, Dice+CE and nnU-Net), ``"all"``);
            default all.
        seed: seed of the random logits and labels.
        log: called with a progress line now and then (e.g. ``print`` to stderr); None for silence.
        compile: ``torch.compile`` every implementation (inductor; ours with ``fullgraph=True``); compilation
            happens in the warm-up calls (at least one).
        allocators: subset of :data:`ALLOCATORS`: ``"default"`` (``THP_MEM_ALLOC_ENABLE`` unset in the child, even
            if this process has it) and ``"thp"`` (``THP_MEM_ALLOC_ENABLE=1``); default both on CPU, and only
            ``"default"`` on CUDA, where the setting does not concern the measured tensors.

    Returns:
        One dict per (allocator, shape, loss), in that order, with keys ``loss``, ``label``, ``family``, ``owner``,
        ``allocator``, ``thp_env`` (the child's ``THP_MEM_ALLOC_ENABLE``, None when unset), ``kernel_thp`` (the
        kernel's THP mode), ``shape`` ("BxCxDxHxW"), ``device``, ``threads``, ``status`` (``"ok"``,
        ``"not installed (...)"`` or ``"error: ..."``), ``memory_status`` (``"ok"``, ``"not measured"`` or
        ``"error: ..."``), ``logits_mb``, ``median_ms``, ``min_ms``, ``retried`` (samples repeated for CPU
        contention), ``wait_pct`` (median over the kept samples of the threads' summed run-queue wait as a
        percentage of the sample's time; NaN on CUDA), ``peak_mb``, ``peak_L`` (peak extra / logits bytes),
        ``time_vs_monai``, ``mem_vs_monai`` (against the MONAI counterpart of the same family, same setting;
        nnU-Net against MONAI DiceLoss), ``time_vs_nnunet``, ``mem_vs_nnunet``, ``bandwidth_gbs``, ``floor_ms``
        (2 L at that bandwidth), ``exp_floor_ms`` (two exp per logit, NaN on CUDA), ``first_touch_ms`` and
        ``fresh_huge_pct`` (first touch of L fresh bytes, and the share of such a tensor on huge pages, under the
        setting; NaN on CUDA), ``time_vs_floor`` and ``mem_vs_floor`` (= ``peak_L``, the floor being 1.0 L).
        Missing figures are NaN. A setting whose child failed gives rows with ``status`` ``"error: ..."``.

    Raises:
        ValueError: a bad shape, count, device, loss or allocator name, ``"thp"`` with CUDA, or
            ``device="cuda"`` without CUDA.
        TypeError: a count that is not an int.
    """
    shape_list = [parse_shape(s) for s in shapes]
    if not shape_list:
        raise ValueError("`shapes` must hold at least one shape B,C,*spatial, got none.")
    check_int("rounds", rounds, 1)
    check_int("warmup", warmup, 0)
    check_int("threads", threads, 1)
    device = check_option("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but torch.cuda.is_available() is False here.")
    settings = _resolve_allocators(allocators, device)
    spec = _Run(
        shapes=tuple(shape_list), losses=tuple(_resolve_losses(losses)), rounds=rounds,
        warmup=max(warmup, 1) if compile else warmup, threads=threads, device=device, memory=bool(memory), seed=seed,
        compile=bool(compile),
    )  # fmt: skip
    say = log or (lambda _msg: None)
    rows: list[dict] = []
    for allocator in settings:
        say(f"[{allocator}] child process with {_ALLOCATOR_TEXT[allocator]}")
        try:
            rows.extend(_run_setting(spec, allocator, say))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            rows.extend(_failed_setting_rows(spec, allocator, _error(e)))
    _add_ratios(rows)
    return rows


def _run_setting(spec: _Run, allocator: str, say: Callable[[str], None]) -> list[dict]:
    """All of ``spec`` under ``allocator``, in a child process (``--_timing-run``); its progress lines go to ``say``."""
    result = _run_child(
        ["--_timing-run", spec.to_json(), "--allocator", allocator], allocator, f"timing subprocess ({allocator})",
        relay=lambda line: say(f"[{allocator}] {line}"),
    )  # fmt: skip
    return list(result["rows"])


def _new_row(key: str, shape: tuple[int, ...], spec: _Run, allocator: str, status: str) -> dict:
    """A row with every figure NaN (filled in as they are measured)."""
    nan = math.nan
    return {
        "loss": key, "label": _SPECS[key].label + (" [compiled]" if spec.compile else ""),
        "family": _SPECS[key].family, "owner": _SPECS[key].owner, "allocator": allocator,
        "thp_env": os.environ.get(THP_ENV), "kernel_thp": _kernel_thp_mode(), "shape": "x".join(map(str, shape)),
        "device": spec.device, "threads": spec.threads, "status": status, "logits_mb": math.prod(shape) * 4 / MB,
        "median_ms": nan, "min_ms": nan, "retried": 0, "wait_pct": nan, "peak_mb": nan, "peak_L": nan,
        "memory_status": "ok" if spec.memory and status == "ok" else "not measured",
        "bandwidth_gbs": nan, "floor_ms": nan, "exp_floor_ms": nan, "first_touch_ms": nan, "fresh_huge_pct": nan,
    }  # fmt: skip


def _failed_setting_rows(spec: _Run, allocator: str, why: str) -> list[dict]:
    rows = [_new_row(k, s, spec, allocator, why) for s in spec.shapes for k in spec.losses]
    for r in rows:
        r["thp_env"] = _ALLOCATOR_ENV[allocator].get(THP_ENV)  # what the child was given
    return rows


def _add_ratios(rows: Sequence[dict]) -> None:
    """Fill the ratio columns of ``rows`` in place, each against rows of the same allocator setting and shape."""
    index = {(r.get("allocator"), r["shape"], r["loss"]): r for r in rows}
    for row in rows:
        where = (row.get("allocator"), row["shape"])
        spec = _SPECS[row["loss"]]
        monai = index.get((*where, "monai-" + ("dice" if spec.owner == "nnunet" else spec.family)))
        nnunet = index.get((*where, "nnunet-memeff"))
        row["peak_L"] = row["peak_mb"] / row["logits_mb"] if row["logits_mb"] > 0 else math.nan
        row["time_vs_floor"] = _ratio(row["median_ms"], row["floor_ms"])
        row["mem_vs_floor"] = row["peak_L"]
        for what, col in (("time", "median_ms"), ("mem", "peak_mb")):
            row[f"{what}_vs_monai"] = _ratio(row[col], monai[col]) if monai else math.nan
            row[f"{what}_vs_nnunet"] = _ratio(row[col], nnunet[col]) if nnunet else math.nan


def _measure(spec: _Run, allocator: str, say: Callable[[str], None]) -> list[dict]:
    """Everything in ``spec``, in this process, as it is: what a setting's child runs (``allocator`` only labels the
    rows and goes on to the memory children). Ratios are left to :func:`_add_ratios`."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        biggest = max(math.prod(s) * 4 for s in spec.shapes)
        # Big enough to leave the caches (a GPU's L2 included), small enough for a shared machine.
        nbytes = 2**30 if spec.device == "cuda" else int(min(max(4 * biggest, 64 * 2**20), 256 * 2**20))
        floor_key = (spec.device, nbytes, spec.threads)
        if floor_key not in _FLOOR_CACHE:  # the machine's bandwidth: measured once per process
            _FLOOR_CACHE[floor_key] = measure_floor(spec.device, nbytes=nbytes)
        floor = _FLOOR_CACHE[floor_key]
        exp = f", exp {floor['exp_ns']:.2f} ns/element" if spec.device == "cpu" else ""
        say(f"copy bandwidth {floor['bandwidth_gbs']:.1f} GB/s{exp}")
        status = {k: _availability(k) for k in spec.losses}
        rows: list[dict] = []
        for shape in spec.shapes:
            rows.extend(_bench_shape(shape, spec, allocator, status, floor, say))
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _bench_shape(
    shape: tuple[int, ...], spec: _Run, allocator: str, status: dict[str, str], floor: dict[str, float],
    say: Callable[[str], None],
) -> list[dict]:  # fmt: skip
    device, keys = spec.device, spec.losses
    logits_bytes = math.prod(shape) * 4
    shape_txt = "x".join(map(str, shape))
    rows = {k: _new_row(k, shape, spec, allocator, status[k]) for k in keys}
    x, y = _make_inputs(shape, device, spec.seed)
    first_touch_ms = measure_first_touch(logits_bytes) if device == "cpu" else math.nan
    huge_share = _huge_page_share(logits_bytes) if device == "cpu" else math.nan
    fns: dict[str, torch.nn.Module] = {}
    for k in keys:
        if status[k] != "ok":
            continue
        try:
            fn = _make_loss(k, spec.compile).to(device)
            for _ in range(spec.warmup):
                _step(fn, x, y)
            fns[k] = fn
        except Exception as e:  # a broken implementation must not hide the others' figures
            rows[k]["status"] = _error(e)
    say(f"timing {shape_txt}: {len(fns)} losses x {spec.rounds} rounds")
    times: dict[str, list[float]] = {k: [] for k in fns}
    waits: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    # On a machine that is busy all the time every sample would be repeated: cap the repeats at one per sample on
    # average, so contention costs at most about twice the time.
    budget = spec.rounds * len(order)
    for r in range(spec.rounds):
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
    if spec.memory and device == "cuda":
        for k, fn in fns.items():
            if rows[k]["status"] == "ok":
                try:
                    rows[k]["peak_mb"] = _peak_cuda(fn, x, y) / MB
                except Exception as e:
                    rows[k]["memory_status"] = _error(e)
    x.grad = None
    del x, y, fns
    gc.collect()
    if spec.memory and device == "cpu":
        for k in keys:
            if rows[k]["status"] != "ok":
                continue
            say(f"memory {shape_txt}: {k} (fresh subprocess)")
            try:
                rows[k]["peak_mb"] = (
                    _peak_cpu_subprocess(k, shape, spec.threads, spec.seed, spec.compile, allocator) / MB
                )
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                rows[k]["memory_status"] = _error(e)
    floor_ms = 2 * logits_bytes / (floor["bandwidth_gbs"] * 1e9) * 1e3
    exp_floor_ms = 2 * math.prod(shape) * floor["exp_ns"] / 1e6 if device == "cpu" else math.nan
    for row in rows.values():
        if row["status"] != "ok":
            row["memory_status"] = "not measured"
        row.update(
            bandwidth_gbs=floor["bandwidth_gbs"], floor_ms=floor_ms, exp_floor_ms=exp_floor_ms,
            first_touch_ms=first_touch_ms, fresh_huge_pct=100 * huge_share,
        )  # fmt: skip
    return list(rows.values())


# ---------------------------------------------------------------------------------------------------- output


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
    """Render :func:`benchmark` rows as text: one block per allocator setting (a heading naming the setting, the
    table, the floor figures per shape), then notes saying what each figure and each setting is.

    Columns: median ms, samples repeated for CPU contention, the share of a sample's time its threads waited for a
    CPU (wait%), peak extra MB, peak extra in logits' bytes (xL), time and memory as multiples of the MONAI
    counterpart and of nnU-Net's loss (both measured under the same setting), time as a multiple of the copy floor.
    Unavailable or failed implementations get one line saying why.

    Args:
        rows: what :func:`benchmark` returned.

    Returns:
        The table as one string (no trailing newline).
    """
    ok = [r for r in rows if r["status"] == "ok"]
    cells = {id(r): [r[k] if spec is None else fmt(r[k], spec) for _, k, spec, _a in _COLUMNS] for r in ok}
    header = [h for h, *_ in _COLUMNS]
    widths = [max([len(header[i])] + [len(c[i]) for c in cells.values()]) for i in range(len(_COLUMNS))]

    def line(c: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, w, (_h, _k, _s, a) in zip(c, widths, _COLUMNS, strict=False)).rstrip()

    settings: list[str] = []
    for r in rows:
        if r.get("allocator", "default") not in settings:
            settings.append(r.get("allocator", "default"))
    out: list[str] = []
    for allocator in settings:
        block = [r for r in rows if r.get("allocator", "default") == allocator]
        if out:
            out.append("")
        out.append(f"== allocator {allocator}: {_ALLOCATOR_TEXT.get(allocator, allocator)} ==")
        out += [line(header), "  ".join("-" * w for w in widths)]
        prev_shape = None
        for r in block:
            if r["status"] != "ok":
                continue
            if prev_shape is not None and r["shape"] != prev_shape:
                out.append("")
            prev_shape = r["shape"]
            out.append(line(cells[id(r)]))
        out.extend(_problems(block))
        out.extend(_shape_lines(block))
    if rows:
        out.append("")
        out.extend(textwrap.fill(note, width=110) for note in _notes(rows, settings))
        busy: dict[tuple[str, str], float] = {}
        for r in ok:
            if isinstance(r.get("wait_pct"), float) and r["wait_pct"] >= _BUSY_WAIT_PCT:
                where = (r.get("allocator", "default"), r["shape"])
                busy[where] = max(busy.get(where, 0.0), r["wait_pct"])
        for (allocator, shape), pct in busy.items():
            out.append(
                f"WARNING {shape} ({allocator}): threads waited for a CPU during up to {pct:.0f}% of a sample; these "
                "times measure the machine's load as much as the losses: rerun on a quiet machine."
            )
    return "\n".join(out)


def _problems(rows: Sequence[dict]) -> list[str]:
    """One line per (implementation, reason) that has no figure: unavailable, failed, or its memory child failed."""
    skipped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            skipped.setdefault((r["label"], r["status"]), []).append(r["shape"])
        elif r["memory_status"].startswith("error"):
            skipped.setdefault((r["label"], "memory " + r["memory_status"]), []).append(r["shape"])
    return [f"{label}: {why} [{', '.join(shapes)}]" for (label, why), shapes in skipped.items()]


def _shape_lines(rows: Sequence[dict]) -> list[str]:
    """Per shape of one setting: L, the floors, and the first touch of L fresh bytes with its huge-page share."""
    lines: list[str] = []
    seen: list[str] = []
    for r in rows:
        if r["shape"] in seen or not math.isfinite(r.get("floor_ms", math.nan)):
            continue
        seen.append(r["shape"])
        exp = "" if not math.isfinite(r["exp_floor_ms"]) else f"; two exp per logit take {r['exp_floor_ms']:.2f} ms"
        touch, huge = r.get("first_touch_ms", math.nan), r.get("fresh_huge_pct", math.nan)
        huge_txt = "" if not math.isfinite(huge) else f" ({huge:.0f}% of it on huge pages)"
        touch_txt = "" if not math.isfinite(touch) else f"; first touch of L fresh bytes {touch:.1f} ms{huge_txt}"
        lines.append(
            f"  {r['shape']}: L = {r['logits_mb']:.1f} MB; time floor {r['floor_ms']:.2f} ms{exp}{touch_txt}; "
            f"memory floor {r['logits_mb']:.1f} MB"
        )
    return lines


def _notes(rows: Sequence[dict], settings: Sequence[str]) -> list[str]:
    r0 = rows[0]
    bandwidth: dict[str, str] = {}
    for r in rows:
        if math.isfinite(r.get("bandwidth_gbs", math.nan)):
            bandwidth.setdefault(r.get("allocator", "default"), f"{r['bandwidth_gbs']:.1f}")
    notes = [
        f"device {r0['device']}, {r0['threads']} threads. t = median forward+backward time, m = peak extra memory "
        "(x.grad included), each as a multiple of the MONAI counterpart (nnU-Net's: of MONAI DiceLoss) or of "
        "nnU-Net's loss measured under the same allocator setting; xL = peak extra / logits' bytes (L). retried = "
        "samples repeated because a thread waited for a CPU; wait% = median run-queue wait of the threads over a "
        "sample's time (large: the machine is busy and times measure contention as much as the loss).",
        "Floors: time = reading the logits and writing their gradient once (2 L) at the copy bandwidth measured "
        f"in each setting's process ({', '.join(f'{a} {b}' for a, b in bandwidth.items()) or '-'} GB/s; t/floor = "
        "time / that); memory = 1.0 L, "
        "the gradient (xL is the distance from it). First touch = what making L bytes of new memory usable cost "
        "under that setting just before the shape was timed (page faults); every implementation pays it at least "
        "once per step, for the gradient, and once more for every other fresh logits-sized temporary.",
    ]
    if r0["device"] != "cpu":
        notes.append(
            f"Allocator: one run with {THP_ENV} unset; on {r0['device']} the CPU allocator's setting does not "
            "concern the measured tensors."
        )
        return notes
    kernel = r0.get("kernel_thp", "n/a")
    text = {
        "default": f"default = {THP_ENV} unset in that child (even if the calling shell sets it): PyTorch's CPU "
        "allocator as users get it, large tensors in fresh mappings faulted in 4 KiB pages",
        "thp": f"thp = {THP_ENV}=1 in that child, for every implementation alike: PyTorch advises each CPU "
        "allocation of 2 MiB or more onto 2 MiB transparent huge pages (about 512x fewer page faults)",
    }
    caveat = {
        "always": "; the kernel's THP mode here is 'always', so default gets huge pages for large aligned extents "
        "too and the two settings differ less",
        "never": "; the kernel's THP mode here is 'never', so the thp setting cannot get huge pages and measures "
        "the same thing as default",
        "madvise": " (kernel THP mode here: 'madvise', huge pages only where asked for)",
    }.get(kernel, f" (kernel THP mode: {kernel})")
    notes.append(
        "Allocator settings: each setting is one child process started with that environment, in which all "
        "implementations are timed together, round-robin, and whose memory children get the same environment: "
        + "; ".join(text.get(a, a) for a in settings)
        + caveat
        + ". Compare rows within a block; across blocks (measured one after the other, so on a shared machine "
        "under different load), one implementation's two times show what page faults cost it."
    )
    return notes


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
    parser.add_argument(
        "--allocator", dest="allocators", nargs="+", action="extend", metavar="NAME",
        help=f"allocator settings, each timed for every loss in its own child process: default ({THP_ENV} unset) "
        f"and/or thp ({THP_ENV}=1); comma or space separated (default: both on cpu; on cuda only default, the "
        "setting concerns CPU tensors)",
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
            allocators=getattr(args, "allocators", None),
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
    """``python -m monai_gdl_plus.app.bench [options]``; also the private entry points of the children: one allocator
    setting's whole run (``--_timing-run``) and one memory case (``--_memory-case``), each printing a JSON object
    as its last line of output."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_timing-run" in argv:
        child = argparse.ArgumentParser(prog="monai_gdl_plus.app.bench --_timing-run")
        child.add_argument("--_timing-run", dest="spec", required=True)
        child.add_argument("--allocator", choices=ALLOCATORS, required=True)
        a = child.parse_args(argv)
        rows = _measure(_Run.from_json(a.spec), a.allocator, lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps({"rows": rows}))
        return 0
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
