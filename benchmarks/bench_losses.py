"""Issue 5's loss benchmark: our losses against MONAI and nnU-Net at three shapes, with the targets checked.

Usage::

    python benchmarks/bench_losses.py                 # the three issue shapes, all losses, time and memory
    python benchmarks/bench_losses.py --no-memory --csv bench.csv
    python benchmarks/bench_losses.py --shape 1,3,32,32,32 --rounds 1   # a quick look
    python benchmarks/bench_losses.py --allocator thp  # one allocator setting only (default: default and thp)
    # a third view, without page faults for anyone (an allocator that keeps freed memory; apt install libjemalloc2):
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true \
        LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/bench_losses.py --no-memory

On a virtual machine the first touch of fresh memory (printed per shape) can cost more than a loss's arithmetic
and varies with the host; MONAI pays it for 3-5 logits-sized tensors per step, we pay it for one (the gradient).
So every implementation is measured under each allocator setting alike, each setting in its own child process:
``default`` (``THP_MEM_ALLOC_ENABLE`` unset: fresh memory in 4 KiB pages) and ``thp`` (``THP_MEM_ALLOC_ENABLE=1``:
PyTorch puts every CPU allocation of 2 MiB or more on huge pages); the targets are checked within each setting.

Method and columns: see :mod:`monai_gdl_plus.app.bench` (per allocator setting, one process for all timings,
warm-ups, round-robin rounds, medians; peak extra memory from a fresh subprocess per case under the same setting).
nnU-Net v2 is compared when importable (``pip install --no-deps nnunetv2``), otherwise its row says "not installed".

Targets (issue 5), at (2, 16, 64³) and (1, 105, 64³):
- time: Dice and GDL at most 0.30x MONAI's DiceLoss / GeneralizedDiceLoss and faster than nnU-Net's
  MemoryEfficientSoftDiceLoss; Dice+CE at most 0.40x MONAI DiceCELoss;
- memory at (1, 105, 64³): at most 0.35x MONAI's counterpart, and Dice and GDL below nnU-Net's.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence

from monai_gdl_plus.app import bench

SHAPES = [(2, 4, 96, 96, 96), (2, 16, 64, 64, 64), (1, 105, 64, 64, 64)]
TIME_SHAPES = ("2x16x64x64x64", "1x105x64x64x64")
MEMORY_SHAPES = ("1x105x64x64x64",)

# (ours, theirs, "time" | "memory", bound, strict): ours / theirs must be <= bound (< when strict).
TARGETS = (
    ("ours-dice", "monai-dice", "time", 0.30, False),
    ("ours-gdl", "monai-gdl", "time", 0.30, False),
    ("ours-dicece", "monai-dicece", "time", 0.40, False),
    ("ours-dice", "nnunet-memeff", "time", 1.0, True),
    ("ours-gdl", "nnunet-memeff", "time", 1.0, True),
    ("ours-dice", "monai-dice", "memory", 0.35, False),
    ("ours-gdl", "monai-gdl", "memory", 0.35, False),
    ("ours-dicece", "monai-dicece", "memory", 0.35, False),
    ("ours-dice", "nnunet-memeff", "memory", 1.0, True),
    ("ours-gdl", "nnunet-memeff", "memory", 1.0, True),
)


def check_targets(rows: Sequence[dict]) -> list[str]:
    """One line per (allocator setting, target, shape): the ratio measured within that setting, the bound, and
    met / MISSED / not measured."""
    by_key = {(r.get("allocator", "default"), r["loss"], r["shape"]): r for r in rows}
    settings = list(dict.fromkeys(r.get("allocator", "default") for r in rows))
    lines = []
    for (ours, theirs, what, bound, strict), allocator in itertools.product(TARGETS, settings):
        col = "median_ms" if what == "time" else "peak_mb"
        for shape in TIME_SHAPES if what == "time" else MEMORY_SHAPES:
            a, b = by_key.get((allocator, ours, shape)), by_key.get((allocator, theirs, shape))
            if a is None and b is None:
                continue  # shape or both losses not in this run
            ratio = a[col] / b[col] if a and b and b[col] > 0 else math.nan
            goal = f"{'<' if strict else '<='} {bound:.2f}x"
            if a is None or b is None:
                verdict = "not measured (not run)"
            elif a["status"] != "ok" or b["status"] != "ok":
                verdict = f"not measured ({a['status'] if a['status'] != 'ok' else b['status']})"
            elif not math.isfinite(ratio):
                verdict = "not measured"
            else:
                verdict = "met" if (ratio < bound if strict else ratio <= bound) else "MISSED"
            names = f"{a['label'] if a else ours} / {b['label'] if b else theirs}"
            shown = f"{ratio:.2f}x" if math.isfinite(ratio) else "-"
            lines.append(f"{what:<6} {allocator:<7} {shape:<15} {names} = {shown} (target {goal}): {verdict}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        bench.check_csv_path(args.csv)
        rows = bench.benchmark(
            args.shapes or SHAPES, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
            device=args.device, memory=args.memory, losses=args.losses, seed=args.seed,
            log=lambda m: print(m, file=sys.stderr, flush=True), compile=args.compile, allocators=args.allocators,
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        print(f"bench_losses: error: {e}", file=sys.stderr)
        return 2
    print(bench.format_table(rows))
    print()
    print("Issue 5 targets:")
    none = f"none checked: they apply at {', '.join(TIME_SHAPES)} (time) and {MEMORY_SHAPES[0]} (memory)"
    for line in check_targets(rows) or [none]:
        print("  " + line)
    if args.csv:
        bench.write_csv(rows, args.csv)
        print(f"rows saved to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
