"""The benchmark from Python: :func:`benchmark` checks its arguments, runs one child process per allocator setting
(``--_timing-run``, :mod:`~monai_gdl_plus.app.bench.measure` inside), and adds the ratios.

Examples:
    >>> parse_shape("2,16,64,64,64"), parse_shape("1x3x8x8")
    ((2, 16, 64, 64, 64), (1, 3, 8, 8))
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable, Sequence

import torch

from monai_gdl_plus.app.bench import children, registry, report
from monai_gdl_plus.app.bench.measure import RunSpec, new_row
from monai_gdl_plus.app.common import check_int
from monai_gdl_plus.options import check_option

__all__ = ["DEVICES", "benchmark", "failed_setting_rows", "parse_shape", "run_setting"]

DEVICES = ("cpu", "cuda")


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

    Each setting runs in its own child process started with that setting's environment (see
    :mod:`monai_gdl_plus.app.bench`); all implementations are timed there together, round-robin, and ratios
    compare rows of the same setting and shape.

    Args:
        shapes: logits shapes (B, C, *spatial), as tuples or ``"B,C,D,H,W"`` strings.
        rounds: round-robin timing rounds (median reported).
        warmup: untimed calls per loss before timing.
        threads: ``torch.set_num_threads`` in the children (CPU only matters).
        device: ``"cpu"`` or ``"cuda"``.
        memory: also measure peak extra memory (CPU: one subprocess per loss and shape, under the same setting).
        losses: subset of :data:`~monai_gdl_plus.app.bench.LOSSES` (or the groups ``"ours"``, ``"monai"``,
            ``"nnunet"``, ``"core"`` (Dice, GDL, Dice+CE and nnU-Net), ``"all"``); default all.
        seed: seed of the random logits and labels.
        log: called with a progress line now and then (e.g. ``print`` to stderr); None for silence.
        compile: ``torch.compile`` every implementation (inductor; ours with ``fullgraph=True``); compilation
            happens in the warm-up calls (at least one).
        allocators: subset of :data:`~monai_gdl_plus.app.bench.ALLOCATORS`: ``"default"``
            (``THP_MEM_ALLOC_ENABLE`` unset in the child, even if this process has it) and ``"thp"``
            (``THP_MEM_ALLOC_ENABLE=1``); default both on CPU, and only ``"default"`` on CUDA, where the setting
            does not concern the measured tensors.

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
    spec = _run_spec(shapes, rounds, warmup, threads, device, memory, losses, seed, compile)
    say = log or (lambda _msg: None)
    rows: list[dict] = []
    for allocator in children.resolve_allocators(allocators, spec.device):
        say(f"[{allocator}] child process with {children.ALLOCATOR_TEXT[allocator]}")
        try:
            rows.extend(run_setting(spec, allocator, say))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            rows.extend(failed_setting_rows(spec, allocator, registry.error_text(e)))
    report.add_ratios(rows)
    return rows


def _run_spec(
    shapes: Iterable[Sequence[int] | str], rounds: int, warmup: int, threads: int, device: str, memory: bool,
    losses: Iterable[str] | None, seed: int, compile: bool,
) -> RunSpec:  # fmt: skip
    """``benchmark``'s arguments, checked, as the spec its children receive."""
    shape_list = [parse_shape(s) for s in shapes]
    if not shape_list:
        raise ValueError("`shapes` must hold at least one shape B,C,*spatial, got none.")
    check_int("rounds", rounds, 1)
    check_int("warmup", warmup, 0)
    check_int("threads", threads, 1)
    device = check_option("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but torch.cuda.is_available() is False here.")
    return RunSpec(
        shapes=tuple(shape_list), losses=tuple(registry.resolve_losses(losses)), rounds=rounds,
        warmup=max(warmup, 1) if compile else warmup, threads=threads, device=device, memory=bool(memory), seed=seed,
        compile=bool(compile),
    )  # fmt: skip


def run_setting(spec: RunSpec, allocator: str, say: Callable[[str], None]) -> list[dict]:
    """All of ``spec`` under ``allocator``, in a child process (``--_timing-run``); its progress lines go to ``say``."""
    result = children.run_child(
        ["--_timing-run", spec.to_json(), "--allocator", allocator], allocator, f"timing subprocess ({allocator})",
        relay=lambda line: say(f"[{allocator}] {line}"),
    )  # fmt: skip
    return list(result["rows"])


def failed_setting_rows(spec: RunSpec, allocator: str, why: str) -> list[dict]:
    """The rows of a setting whose child failed: every figure NaN, ``status`` saying why."""
    rows = [new_row(k, s, spec, allocator, why) for s in spec.shapes for k in spec.losses]
    for r in rows:
        r["thp_env"] = children.ALLOCATOR_ENV[allocator].get(children.THP_ENV)  # what the child was given
    return rows
