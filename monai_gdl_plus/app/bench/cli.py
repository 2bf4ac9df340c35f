"""The benchmark's command line: the options of ``gdl-plus bench`` (:func:`configure_parser`, :func:`run`) and
``python -m monai_gdl_plus.app.bench`` (:func:`main`), which is also how the child processes are started: one
allocator setting's whole run (``--_timing-run``) and one memory case (``--_memory-case``), each printing a JSON
object as its last line of output.

Examples:
    >>> parser = argparse.ArgumentParser(prog="gdl-plus bench")
    >>> configure_parser(parser)
    >>> args = parser.parse_args(["--shape", "1,3,8,8,8", "--losses", "core"])
    >>> args.shapes, args.rounds, args.losses
    ([(1, 3, 8, 8, 8)], 7, ['core'])
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from monai_gdl_plus.app.bench import children, measure, memory, registry, report, runner, traffic

__all__ = ["configure_parser", "main", "run"]


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        return runner.parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (used by ``gdl-plus bench`` and ``python -m monai_gdl_plus.app.bench``).

    Args:
        parser: the (sub)parser to fill.
    """
    thp = children.THP_ENV
    parser.add_argument(
        "--shape", dest="shapes", type=_shape_arg, nargs="+", action="extend", metavar="B,C,D,H,W",
        help="logits shape; repeat the option or give several (default: 2,16,64,64,64)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7, help="round-robin timing rounds, median reported (7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per loss before timing (2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--device", choices=runner.DEVICES, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    parser.add_argument(
        "--losses", nargs="+", action="extend", metavar="NAME",
        help=f"subset (comma or space separated) of {', '.join(registry.LOSSES)}, or ours / monai / nnunet / core / "
        "all",
    )  # fmt: skip
    parser.add_argument(
        "--allocator", dest="allocators", nargs="+", action="extend", metavar="NAME",
        help=f"allocator settings, each timed for every loss in its own child process: default ({thp} unset) "
        f"and/or thp ({thp}=1); comma or space separated (default: both on cpu; on cuda only default, the "
        "setting concerns CPU tensors)",
    )  # fmt: skip
    parser.add_argument("--csv", metavar="PATH", help="also save the rows as CSV")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every implementation (inductor; compiled in the warm-up)"
    )
    parser.add_argument(
        "--traffic", action="store_true",
        help="instead of timing: count the bytes read and written (as multiples of the logits' bytes L) and the "
        "launches of one forward+backward step, from the aten ops dispatched",
    )  # fmt: skip
    parser.add_argument(
        "--traffic-device", choices=traffic.TRAFFIC_DEVICES, default="meta",
        help="where --traffic counts: meta (default; shapes only, the accelerator route, any shape in seconds), "
        "cpu (the host route, computed) or cuda",
    )  # fmt: skip
    parser.add_argument(
        "--traffic-dtype", choices=tuple(traffic.TRAFFIC_DTYPES), default="float32",
        help="the logits' dtype for --traffic (float32; float16/bfloat16: what a network under autocast hands the "
        "loss); L is their bytes",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments, print the table; 0 on success, 1 if a loss failed, 2 on bad input.

    Args:
        args: a namespace from a parser filled by :func:`configure_parser`.

    Returns:
        The exit status.
    """
    shapes = getattr(args, "shapes", None) or [(2, 16, 64, 64, 64)]
    if getattr(args, "traffic", False):
        return _run_traffic(args, shapes)
    try:
        report.check_csv_path(args.csv)
        rows = runner.benchmark(
            shapes, rounds=args.rounds, warmup=args.warmup, threads=args.threads, device=args.device,
            memory=args.memory, losses=args.losses, seed=getattr(args, "seed", 0),
            log=lambda m: print(m, file=sys.stderr, flush=True), compile=getattr(args, "compile", False),
            allocators=getattr(args, "allocators", None),
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        print(f"gdl-plus bench: error: {e}", file=sys.stderr)
        return 2
    print(report.format_table(rows))
    if not _save_csv(rows, args.csv):
        return 2
    return 1 if any(r["status"].startswith("error") or r["memory_status"].startswith("error") for r in rows) else 0


def _run_traffic(args: argparse.Namespace, shapes: list[tuple[int, ...]]) -> int:
    """``--traffic``: the traffic table instead of the timing one (same exit statuses)."""
    try:
        if getattr(args, "compile", False):
            raise ValueError("`--traffic` counts the eager step's aten ops; it cannot be combined with `--compile`.")
        report.check_csv_path(args.csv)
        rows = traffic.traffic_rows(shapes, losses=args.losses, device=args.traffic_device,
                                    dtype=args.traffic_dtype, seed=args.seed)  # fmt: skip
    except (ValueError, TypeError) as e:
        print(f"gdl-plus bench: error: {e}", file=sys.stderr)
        return 2
    print(report.format_traffic_table(rows))
    if not _save_csv(rows, args.csv):
        return 2
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_gdl_plus.app.bench [options]``; also the private entry points of the children: one allocator
    setting's whole run (``--_timing-run``) and one memory case (``--_memory-case``), each printing a JSON object
    as its last line of output."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_timing-run" in argv:
        return _timing_child(argv)
    if "--_memory-case" in argv:
        return _memory_child(argv)
    parser = argparse.ArgumentParser(
        prog="python -m monai_gdl_plus.app.bench",
        description="Forward+backward time and peak memory of our losses against MONAI's and nnU-Net's, under each "
        "allocator setting.",
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


def _timing_child(argv: list[str]) -> int:
    child = argparse.ArgumentParser(prog="monai_gdl_plus.app.bench --_timing-run")
    child.add_argument("--_timing-run", dest="spec", required=True)
    child.add_argument("--allocator", choices=children.ALLOCATORS, required=True)
    a = child.parse_args(argv)
    spec = measure.RunSpec.from_json(a.spec)
    rows = measure.measure(spec, a.allocator, lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"rows": rows}))
    return 0


def _memory_child(argv: list[str]) -> int:
    child = argparse.ArgumentParser(prog="monai_gdl_plus.app.bench --_memory-case")
    child.add_argument("--_memory-case", dest="key", choices=registry.LOSSES, required=True)
    child.add_argument("--shape", type=_shape_arg, required=True)
    child.add_argument("--threads", type=int, default=2)
    child.add_argument("--seed", type=int, default=0)
    child.add_argument("--compile", action="store_true")
    a = child.parse_args(argv)
    print(json.dumps(memory.memory_child(a.key, a.shape, a.threads, a.seed, a.compile)))
    return 0


def _save_csv(rows: list[dict], path: str | None) -> bool:
    """``--csv``: the rows written to ``path`` (nothing without one); False, with a one-line error, when the file
    cannot be written."""
    if path:
        try:
            report.write_csv(rows, path)
        except OSError as e:
            print(f"gdl-plus bench: error: cannot write `--csv` {path!r}: {e}", file=sys.stderr)
            return False
        print(f"rows saved to {path}")
    return True
