"""The ``gdl-plus`` command line (also ``python -m monai_gdl_plus``).

Subcommands:

- ``demo``: trains the shipped bundle (``configs/train.yaml``) briefly on synthetic class-imbalanced 3D volumes
  (or ``--data`` a Decathlon folder), with a progress bar; prints a per-class Dice table and writes a run folder
  (CSV history, TensorBoard events, PNG of per-class Dice curves, best checkpoint).
- ``compare``: the same data and seed, several loss variants trained the same way; one table, one plot, and which
  variant helps the rarest class most.
- ``bench``: loss forward+backward time and peak memory against MONAI's losses (see :mod:`monai_gdl_plus.app.bench`).
- ``config``: prints the path of the shipped bundle config, for ``python -m monai.bundle run --config_file``.

``demo`` and ``compare`` take ``--nproc N``: the same run on N processes, launched through
``torch.distributed.run`` (torchrun's API), one GPU each when CUDA is there, CPU processes (gloo) otherwise, with the
bundle's ``multi_gpu_train.yaml``; rank 0 prints and writes the run folder. ``--nnodes/--node-rank/--master-addr/
--master-port`` make it one node of several (the same command on every node, each with its own ``--node-rank``).

Bad input (a dataset folder that fails its checks, an unknown variant, bad sizes) ends with one line on stderr and
exit status 2, never a traceback (``--traceback`` shows it for debugging).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from monai_gdl_plus.app.common import format_number
from monai_gdl_plus.app.distributed import end_process_group
from monai_gdl_plus.app.training import (
    CONFIG_PATH,
    DEFAULT_BATCH,
    DEFAULT_LR,
    DEFAULT_SAMPLES,
    DEFAULT_SIZE,
    VARIANTS,
    RunResult,
    is_rank0,
    train_bundle,
)  # fmt: skip

__all__ = ["DEFAULT_COMPARE", "DEFAULT_VARIANT", "build_parser", "main"]

DEFAULT_VARIANT = "gdl-square+ce"  # the bundle's own loss
DEFAULT_COMPARE = ("dice", "dice+ce", "gdl-square", "gdl-square+ce")
DEVICES = ("auto", "cpu", "cuda")

# demo defaults, sized for about two minutes on 2 CPU cores (compare: about as long per variant); the sizes of
# the data and the training: monai_gdl_plus.app.training
DEFAULT_EPOCHS = 20
DEFAULT_COMPARE_EPOCHS = 20


class _CLIError(Exception):
    """Bad command-line input: reported as one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers


def _parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.replace(" ", ",").split(",") if v.strip()]
    if not names:
        raise _CLIError(f"`--variants` must name at least one of {', '.join(VARIANTS)}, got {text!r}")
    for name in names:
        _check_variant(name, "--variants")
    if len(set(names)) != len(names):
        raise _CLIError(f"`--variants` names a variant twice: {text!r}")
    return names


def _check_variant(name: str, option: str) -> str:
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _CLIError(f"`{option}`: unknown variant {name!r}{hint}; choose from {', '.join(VARIANTS)}")
    return name


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _CLIError(f"`--device {device}`: CUDA is not available on this machine (use --device cpu)")
        try:
            index = torch.device(device).index
        except RuntimeError:
            raise _CLIError(f"`--device` must be auto, cpu, cuda or cuda:N, got {device!r}") from None
        if index is not None and index >= torch.cuda.device_count():
            raise _CLIError(f"`--device {device}`: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    if device != "cpu":
        raise _CLIError(f"`--device` must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def _run_path(out: str | None, kind: str) -> Path:
    return Path(out) if out else Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def _run_folder(out: str | None, kind: str) -> Iterator[Path]:
    """Create the run folder (``--out`` or ``runs/<kind>-<timestamp>``); if the run fails before writing any file
    into it, remove what this created, so that a failed run leaves no empty folder behind."""
    path = _run_path(out, kind)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise _CLIError(f"`--out` {str(path)!r} already exists and is not an empty folder; choose a new one")
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _CLIError(f"`--out`: cannot create {str(path)!r}: {e.strerror or e}") from None
    try:
        yield path
    except BaseException:
        if not any(p.is_file() for p in path.rglob("*")):
            for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            if not existed:
                path.rmdir()
        raise


def _positive(name: str, minimum: int = 1, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{name} must be <= {maximum}, got {value}")
        return value

    return parse


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr must be a number, got {text!r}") from None
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"--lr must be a positive finite number, got {text}")
    return value


def _size(text: str) -> int:
    value = _positive("--size", 16)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"--size must be a multiple of 8 (the UNet halves it 3 times), got {value}")
    return value


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keep the terminal for the progress bar and tables: library INFO logs and warnings are hidden."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import monai.bundle.workflows  # noqa: F401  its logger is set to INFO when first imported: import it first

    saved = {name: logging.getLogger(name).level for name in ("monai.bundle.workflows",)}
    logging.getLogger("monai.bundle.workflows").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _check_data(path: str | None, check_labels: bool = True) -> Any:
    if path is None:
        return None
    from monai_gdl_plus.app.data import load_decathlon

    return load_decathlon(path, check_labels=check_labels)


# ------------------------------------------------------------------------------------------------ output


def _class_table(result: RunResult) -> str:
    width = max(len(n) for n in result.reported + ["class", "mean"]) + 2
    lines = [f"{'class':<{width}}{'voxels':>9}  {'Dice':>6}", "-" * (width + 17)]
    for name in result.reported:
        share = result.shares.get(name, math.nan)
        mark = "  <- rare" if name == result.rare else ""
        lines.append(f"{name:<{width}}{share * 100:>8.2f}%  {format_number(result.final.get(name, math.nan)):>6}{mark}")
    lines.append(f"{'mean':<{width}}{'':>9}  {format_number(result.final.get('mean', math.nan)):>6}")
    return "\n".join(lines)


def _compare_table(results: Sequence[RunResult]) -> str:
    names = results[0].reported + ["mean"]
    width = max(len(r.variant) for r in results) + 2
    cols = [max(len(n), 6) + 2 for n in names]
    head = f"{'variant':<{width}}" + "".join(f"{n:>{w}}" for n, w in zip(names, cols, strict=False)) + f"{'time':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        cells = "".join(f"{format_number(r.final.get(n, math.nan)):>{w}}" for n, w in zip(names, cols, strict=False))
        lines.append(f"{r.variant:<{width}}{cells}{r.seconds:>7.0f}s")
    return "\n".join(lines)


def _verdict(results: Sequence[RunResult]) -> str:
    rare = results[0].rare
    share = results[0].shares.get(rare, math.nan)

    def score(r: RunResult) -> float:
        v = r.final.get(rare, math.nan)
        return -math.inf if math.isnan(v) else v

    best = max(results, key=score)
    head = f"Rare class {rare!r} ({share * 100:.2f}% of voxels):"
    if score(best) <= 0.0:
        return f"{head} no variant segmented it yet (Dice 0 or undefined everywhere); try more --epochs."
    others = [r for r in results if r is not best]
    if not others:
        return f"{head} {best.variant} reaches Dice {best.final[rare]:.3f}."
    runner = max(others, key=score)
    if score(runner) == score(best):
        tied = ", ".join(r.variant for r in results if score(r) == score(best))
        return f"{head} {tied} tie for the best Dice ({best.final[rare]:.3f})."
    gap = "undefined" if score(runner) == -math.inf else f"{runner.final[rare]:.3f}"
    text = f"{head} {best.variant} helps it most (Dice {best.final[rare]:.3f}; next best {runner.variant} {gap})"

    def mean(r: RunResult) -> float:
        v = r.final.get("mean", math.nan)
        return -math.inf if math.isnan(v) else v

    top = max(results, key=mean)
    if top is not best and mean(best) < mean(top) - 0.05:  # say when the rare class was bought with the others
        cost = f"mean Dice {format_number(best.final.get('mean'))} vs {format_number(top.final['mean'])}"
        text += f", at a cost: {cost} for {top.variant}"
    return text + "."


def _write_compare_csv(results: Sequence[RunResult], path: Path) -> None:
    names = results[0].reported + ["mean"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", *names, "seconds", "epochs"])
        for r in results:
            writer.writerow([r.variant, *(r.final.get(n, math.nan) for n in names), f"{r.seconds:.1f}", len(r.history)])


def _plot_compare(results: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rare, names = results[0].rare, results[0].reported
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        epochs = range(1, len(r.history) + 1)
        ax_curve.plot(epochs, [h.get(rare, math.nan) for h in r.history], marker="o", ms=3, label=r.variant)
    ax_curve.set(title=f"validation Dice of the rare class {rare!r}", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(names) + 1)]
        ax_bar.bar(xs, [r.final.get(n, math.nan) for n in names + ["mean"]], width=width, label=r.variant)
    ax_bar.set_xticks(range(len(names) + 1), names + ["mean"])
    ax_bar.set(title="final per-class validation Dice", ylabel="Dice", ylim=(0, 1))
    ax_bar.grid(axis="y", alpha=0.3)
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _describe_run_folder(out: Path) -> list[str]:
    lines = [f"Run folder: {out}"]
    entries = [
        ("per_class_dice.csv", "per-class Dice history (one row per epoch)"),
        ("per_class_dice.png", "per-class Dice curves"),
        ("model.pt", "best checkpoint (highest mean Dice)"),
    ]
    for name, what in entries:
        if (out / name).exists():
            lines.append(f"  {name:<22} {what}")
    if any(out.glob("events.out.tfevents.*")):
        lines.append(f"  {'events.out.tfevents.*':<22} TensorBoard: tensorboard --logdir {out}")
    return lines


# ------------------------------------------------------------------------------------------------ several processes

_LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--out")


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc", type=_positive("--nproc"), metavar="N",
        help="run on N processes per node through torchrun (torch.distributed.run): one GPU each when CUDA is "
        "there, CPU processes otherwise; rank 0 prints and writes the run folder",
    )  # fmt: skip
    p.add_argument("--nnodes", type=_positive("--nnodes"), default=1, help="with --nproc: machines taking part (1)")
    p.add_argument("--node-rank", type=_positive("--node-rank", 0), default=0, help="with --nproc: this node (0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="with --nproc: node 0's address (127.0.0.1)")
    p.add_argument(
        "--master-port", type=_positive("--master-port", 1, 65535), default=None,
        help="with --nproc: a free port on node 0 (with --nnodes 1: any free one)",
    )  # fmt: skip
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)  # set by the launcher for its ranks


def _worker_argv(argv: Sequence[str], out: Path) -> list[str]:
    """The command line of every rank: the user's, without the launch options and ``--out``, plus ``--_worker`` and
    the run folder the launcher made."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _LAUNCH_OPTIONS)):
            kept.append(arg)
    return [*kept, "--_worker", "--out", str(out)]


def _launch(args: argparse.Namespace, device: str) -> int:
    """Run this very command on ``--nproc`` processes (per node) through ``torch.distributed.run``.

    The launcher checks the input and makes the run folder (node 0); each rank runs ``python -m monai_gdl_plus``
    with the same arguments plus ``--_worker``. Returns 0, or the first failed rank's exit status.
    """
    import os

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if args.node_rank >= args.nnodes:
        raise _CLIError(f"`--node-rank` must be below `--nnodes` ({args.nnodes}), got {args.node_rank}")
    if args.nnodes > 1 and args.master_port is None:
        raise _CLIError("`--master-port` is needed with `--nnodes` > 1: the same free port of node 0 on every node")
    if device.startswith("cuda:"):
        raise _CLIError(f"`--device {device}` cannot be used with `--nproc`: each rank takes its LOCAL_RANK's GPU")
    if device == "cuda" and args.nproc > torch.cuda.device_count():
        raise _CLIError(f"`--nproc {args.nproc}` on CUDA needs as many GPUs; {torch.cuda.device_count()} present")
    torchrun = ["--nproc-per-node", str(args.nproc), "--nnodes", str(args.nnodes)]
    if args.nnodes == 1 and args.master_port is None:
        torchrun.append("--standalone")  # a local rendezvous on a free port
    else:
        torchrun += ["--node-rank", str(args.node_rank), "--master-addr", args.master_addr,
                     "--master-port", str(args.master_port)]  # fmt: skip
    # the CPU cores shared out between this node's ranks (torchrun would set 1 and warn)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    # node 0 holds rank 0, which writes the run folder; other nodes make none
    folder = _run_folder(args.out, args.command) if args.node_rank == 0 else contextlib.nullcontext(
        _run_path(args.out, args.command))
    try:
        with folder as out:  # a failure leaves no empty run folder behind (_run_folder)
            run(parse_args([*torchrun, "--module", "monai_gdl_plus", *_worker_argv(args.argv, out)]))
    except ChildFailedError as e:
        code = next(iter(e.failures.values())).exitcode  # the first rank to fail
        print(f"gdl-plus {args.command}: error: {len(e.failures)} of the processes failed "
              f"(first: exit status {code}, see its message above)", file=sys.stderr)  # fmt: skip
        return code if code > 0 else 1
    if args.node_rank > 0:
        print(f"gdl-plus {args.command}: node {args.node_rank} done; rank 0 (node 0) printed the results and "
              "wrote the run folder")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ commands


def _common_training_args(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--epochs", type=_positive("--epochs"), default=epochs, help=f"training epochs ({epochs})")
    p.add_argument("--data", metavar="PATH", help="Decathlon-format folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, default), cpu, cuda or cuda:N")
    p.add_argument("--out", metavar="DIR", help="run folder to create (default: runs/<command>-<timestamp>)")
    p.add_argument(
        "--num-samples", type=_positive("--num-samples", 2), default=DEFAULT_SAMPLES,
        help=f"synthetic volumes, training + validation ({DEFAULT_SAMPLES})",
    )  # fmt: skip
    p.add_argument(
        "--size", type=_size, default=DEFAULT_SIZE,
        help=f"edge of the synthetic volumes and training patches, a multiple of 8 ({DEFAULT_SIZE})",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=_positive("--batch-size"), default=DEFAULT_BATCH,
        help=f"training batch size, per process with --nproc ({DEFAULT_BATCH})",
    )  # fmt: skip
    p.add_argument("--lr", type=_learning_rate, default=DEFAULT_LR, help=f"Adam learning rate ({DEFAULT_LR})")
    p.add_argument(
        "--seed", type=_positive("--seed", 0, 2**32 - 1), default=0,
        help="seed of data, split, initialisation and shuffling, in [0, 2**32) as NumPy's (0)",
    )  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _launch_args(p)


def _train_kwargs(args: argparse.Namespace, decathlon: Any) -> dict[str, Any]:
    return dict(
        epochs=args.epochs, device=_resolve_device(args.device), data_dir=args.data, decathlon=decathlon,
        num_samples=args.num_samples, size=args.size, batch_size=args.batch_size, learning_rate=args.lr,
        seed=args.seed, progress=args.progress, quiet_errors=not args.traceback, distributed=args._worker,
    )  # fmt: skip


def _where(args: argparse.Namespace, device: str) -> str:
    if args.nproc is None:
        return device
    nodes = f" on each of {args.nnodes} nodes" if args.nnodes > 1 else ""
    many = args.nproc > 1
    kind = ("GPUs" if many else "GPU") if device == "cuda" else ("CPU processes" if many else "CPU process")
    return f"{args.nproc} {kind}{nodes} (torchrun)"


@contextlib.contextmanager
def _output_folder(args: argparse.Namespace, kind: str) -> Iterator[Path]:
    """The run folder: made here, or by the launcher for its ranks (``--_worker``)."""
    if args._worker:
        yield Path(args.out)
    else:
        with _run_folder(args.out, kind) as out:
            yield out


def _source(args: argparse.Namespace, decathlon: Any) -> str:
    if decathlon is not None:
        return f"{decathlon.name} ({len(decathlon.items)} cases from {decathlon.root})"
    return f"synthetic, {args.num_samples} volumes of {args.size}^3"


def _cmd_demo(args: argparse.Namespace) -> int:
    """``gdl-plus demo``: train the bundle once, print the per-class table and the run folder."""
    variant = _check_variant(args.loss, "--loss")
    kwargs = _train_kwargs(args, decathlon := _check_data(args.data, check_labels=not args._worker))
    if args.nproc is not None and not args._worker:
        print(f"gdl-plus demo: loss {variant}, {args.epochs} epochs on {_where(args, kwargs['device'])}, "
              f"data {_source(args, decathlon)}")  # fmt: skip
        return _launch(args, kwargs["device"])
    with _output_folder(args, "demo") as out:
        if not args._worker:
            print(f"gdl-plus demo: loss {variant}, {args.epochs} epochs on {kwargs['device']}, "
                  f"data {_source(args, decathlon)}")  # fmt: skip
        with _quiet_libraries():
            result = train_bundle(variant=variant, out_dir=out, **kwargs)
    if args._worker and not is_rank0():  # rank 0 prints; main() ends every rank's part in the process group
        return 0
    print()
    print(f"Per-class validation Dice after {len(result.history)} epochs ({result.seconds:.0f} s, loss {variant}):")
    print(_class_table(result))
    print()
    print("\n".join(_describe_run_folder(out)))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """``gdl-plus compare``: several loss variants on the same data and seed; one table, one plot, a verdict."""
    variants = _parse_variants(args.variants)
    kwargs = _train_kwargs(args, decathlon := _check_data(args.data, check_labels=not args._worker))
    header = (
        f"gdl-plus compare: {', '.join(variants)}; {args.epochs} epochs each on {_where(args, kwargs['device'])}, "
        f"data {_source(args, decathlon)}, seed {args.seed}"
    )
    if args.nproc is not None and not args._worker:
        print(header)
        return _launch(args, kwargs["device"])
    results = []
    rank0 = is_rank0()
    with _output_folder(args, "compare") as out:
        if not args._worker:
            print(header)
        with _quiet_libraries():
            for variant in variants:
                results.append(train_bundle(variant=variant, out_dir=out / variant, echo=False, **kwargs))
                r = results[-1]
                if rank0:
                    mean = format_number(r.final.get("mean", math.nan))
                    print(f"  {variant:<20} done in {r.seconds:5.0f} s   mean Dice {mean}", flush=True)
    if args._worker and not rank0:
        return 0
    csv_path, png_path = out / "compare.csv", out / "compare.png"
    _write_compare_csv(results, csv_path)
    _plot_compare(results, png_path)
    print()
    print(f"Final per-class validation Dice after {args.epochs} epochs (same data and seed):")
    print(_compare_table(results))
    print()
    print(_verdict(results))
    print()
    print(f"Table: {csv_path}\nPlot:  {png_path}\nRuns:  {out}/<variant>/ (CSV, TensorBoard, PNG, checkpoint each)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """``gdl-plus bench``: delegated to :mod:`monai_gdl_plus.app.bench`."""
    from monai_gdl_plus.app import bench

    return int(bench.run(args))


def _cmd_config(args: argparse.Namespace) -> int:
    """``gdl-plus config``: print the path of the shipped bundle config."""
    print(CONFIG_PATH)
    return 0


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The ``gdl-plus`` argument parser.

    Args:
        with_bench: fill the ``bench`` subcommand's options (imports :mod:`monai_gdl_plus.app.bench`); without it the
            subcommand is only listed, so the other commands never import the benchmark.
    """
    from monai_gdl_plus import __version__

    parser = argparse.ArgumentParser(
        prog="gdl-plus",
        description="Dice-family losses and per-class Dice for MONAI: demo, loss comparison, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"monai_gdl_plus {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train the shipped bundle briefly, print per-class Dice, write a run folder",
        description="Train a small 3D UNet (the shipped bundle) on synthetic class-imbalanced volumes "
        "(or --data), with a progress bar; print per-class Dice and write CSV, TensorBoard and PNG to a run folder.",
    )  # fmt: skip
    _common_training_args(demo, DEFAULT_EPOCHS)
    demo.add_argument(
        "--loss", default=DEFAULT_VARIANT, metavar="VARIANT",
        help=f"loss variant ({DEFAULT_VARIANT}); one of {', '.join(VARIANTS)}",
    )  # fmt: skip
    demo.set_defaults(func=_cmd_demo)

    compare = sub.add_parser(
        "compare", help="train several loss variants on the same data; which helps the rare class",
        description="Train the bundle once per loss variant, same data and seed; print one table of final "
        "per-class Dice, save one plot, and name the variant that helps the rarest class most.",
    )  # fmt: skip
    _common_training_args(compare, DEFAULT_COMPARE_EPOCHS)
    compare.add_argument(
        "--variants", default=",".join(DEFAULT_COMPARE),
        help=f"comma-separated ({','.join(DEFAULT_COMPARE)}); available: {', '.join(VARIANTS)}",
    )  # fmt: skip
    compare.set_defaults(func=_cmd_compare)

    bench = sub.add_parser(
        "bench", help="loss forward+backward time and peak memory against MONAI's losses, as ratios",
        description="Time and peak memory of the losses against MONAI's (and nnU-Net's when importable).",
    )  # fmt: skip
    if with_bench:
        from monai_gdl_plus.app import bench as bench_module

        bench_module.configure_parser(bench)
    bench.set_defaults(func=_cmd_bench)

    config = sub.add_parser("config", help="print the path of the shipped bundle config (train.yaml)")
    config.set_defaults(func=_cmd_config)
    return parser


def _innermost(exc: BaseException) -> BaseException:
    # MONAI wraps errors raised while evaluating a config expression in RuntimeError("Failed to evaluate ...")
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gdl-plus`` and ``python -m monai_gdl_plus``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status: 0 on success, 2 for bad input, 1 for an unexpected failure, 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(with_bench=command == "bench")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse prints its own one-line usage error
        return int(e.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    args.argv = argv  # the launcher (--nproc) hands the same command line to its ranks
    prog = f"gdl-plus {args.command}"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback:
            raise
        from monai_gdl_plus.app.data import DatasetError

        inner = _innermost(e)
        if isinstance(e, _CLIError) or isinstance(inner, DatasetError):
            print(f"{prog}: error: {_one_line(inner)}", file=sys.stderr)
            return 2
        if isinstance(inner, (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError)):
            print(f"{prog}: error: {type(inner).__name__}: {_one_line(inner)}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {type(inner).__name__}: {_one_line(inner)} (run with --traceback for details)",
              file=sys.stderr)  # fmt: skip
        return 1
    finally:
        if getattr(args, "_worker", False):  # a rank of --nproc, after success or failure alike
            end_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
