"""The report: ratios between rows of one allocator setting and shape, the text tables (time and memory; traffic),
the CSV.

Ratios (``t/MONAI`` etc.) compare implementations within one setting, never across settings.

Examples:
    >>> rows = [{"loss": k, "allocator": "default", "shape": "1x3x8x8x8", "median_ms": ms, "peak_mb": 1.0,
    ...          "logits_mb": 1.0, "floor_ms": 1.0} for k, ms in (("ours-dice", 3.0), ("monai-dice", 12.0))]
    >>> add_ratios(rows)
    >>> rows[0]["time_vs_monai"], rows[0]["time_vs_floor"]
    (0.25, 3.0)
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
from collections.abc import Sequence

from monai_gdl_plus.app.bench import children, registry
from monai_gdl_plus.app.common import format_number

__all__ = ["add_ratios", "check_csv_path", "format_table", "format_traffic_table", "write_csv"]

_BUSY_WAIT_PCT = 10.0  # median wait% from which the table warns that the times are not reliable
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

_TRAFFIC_COLUMNS = (
    ("loss", "label", None, "<"),
    ("shape", "shape", None, "<"),
    ("read/L", "read_L", ".2f", ">"),
    ("written/L", "written_L", ".2f", ">"),
    ("total/L", "total_L", ".2f", ">"),
    ("launches", "launches", ".0f", ">"),
)


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def add_ratios(rows: Sequence[dict]) -> None:
    """Fill the ratio columns of ``rows`` in place, each against rows of the same allocator setting and shape."""
    index = {(r.get("allocator"), r["shape"], r["loss"]): r for r in rows}
    for row in rows:
        where = (row.get("allocator"), row["shape"])
        spec = registry.SPECS[row["loss"]]
        monai = index.get((*where, "monai-" + ("dice" if spec.owner == "nnunet" else spec.family)))
        nnunet = index.get((*where, "nnunet-memeff"))
        row["peak_L"] = row["peak_mb"] / row["logits_mb"] if row["logits_mb"] > 0 else math.nan
        row["time_vs_floor"] = _ratio(row["median_ms"], row["floor_ms"])
        row["mem_vs_floor"] = row["peak_L"]
        for what, col in (("time", "median_ms"), ("mem", "peak_mb")):
            row[f"{what}_vs_monai"] = _ratio(row[col], monai[col]) if monai else math.nan
            row[f"{what}_vs_nnunet"] = _ratio(row[col], nnunet[col]) if nnunet else math.nan


def format_table(rows: Sequence[dict]) -> str:
    """Render ``benchmark`` rows as text: one block per allocator setting (a heading naming the setting, the
    table, the floor figures per shape), then notes saying what each figure and each setting is.

    Columns: median ms, samples repeated for CPU contention, the share of a sample's time its threads waited for a
    CPU (wait%), peak extra MB, peak extra in logits' bytes (xL), time and memory as multiples of the MONAI
    counterpart and of nnU-Net's loss (both measured under the same setting), time as a multiple of the copy floor.
    Unavailable or failed implementations get one line saying why.

    Args:
        rows: what ``benchmark`` returned.

    Returns:
        The table as one string (no trailing newline).
    """
    ok = [r for r in rows if r["status"] == "ok"]
    cells, header, widths, line = _layout(_COLUMNS, ok)

    settings = list(dict.fromkeys(r.get("allocator", "default") for r in rows))
    out: list[str] = []
    for allocator in settings:
        block = [r for r in rows if r.get("allocator", "default") == allocator]
        if out:
            out.append("")
        out.append(f"== allocator {allocator}: {children.ALLOCATOR_TEXT.get(allocator, allocator)} ==")
        out += [line(header), "  ".join("-" * w for w in widths)]
        shown = [r for r in block if r["status"] == "ok"]
        for prev, r in zip([None, *shown], shown, strict=False):
            if prev is not None and r["shape"] != prev["shape"]:
                out.append("")
            out.append(line(cells[id(r)]))
        out += _problems(block) + _shape_lines(block)
    if rows:
        out.append("")
        out.extend(textwrap.fill(note, width=110) for note in _notes(rows, settings))
        out.extend(_busy_warnings(ok))
    return "\n".join(out)


def _layout(columns: Sequence[tuple], rows: Sequence[dict]):
    """The cells of ``rows`` under ``columns`` (heading, key, format or None for text, alignment), the header,
    the column widths and the function that renders one line of cells."""
    cells = {id(r): [r[k] if spec is None else format_number(r[k], spec, "-") for _, k, spec, _a in columns]
             for r in rows}  # fmt: skip
    header = [h for h, *_ in columns]
    widths = [max([len(header[i])] + [len(c[i]) for c in cells.values()]) for i in range(len(columns))]

    def line(c: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, w, (_h, _k, _s, a) in zip(c, widths, columns, strict=False)).rstrip()

    return cells, header, widths, line


def format_traffic_table(rows: Sequence[dict]) -> str:
    """Render :func:`~monai_gdl_plus.app.bench.traffic.traffic_rows` as text: bytes read, written and their total
    per forward+backward step as multiples of the logits' bytes (L), and the launches; a blank line between shapes,
    one line per implementation without figures, L per shape, then notes saying how the figures were counted.

    Args:
        rows: what ``traffic_rows`` returned.

    Returns:
        The table as one string (no trailing newline).
    """
    ok = [r for r in rows if r["status"] == "ok"]
    cells, header, widths, line = _layout(_TRAFFIC_COLUMNS, ok)
    device = rows[0]["device"] if rows else "-"
    dtype = rows[0]["dtype"] if rows else "-"
    out = [f"== traffic per forward+backward step, {dtype} logits, counted on {device} ==", line(header),
           "  ".join("-" * w for w in widths)]  # fmt: skip
    for prev, r in zip([None, *ok], ok, strict=False):
        if prev is not None and r["shape"] != prev["shape"]:
            out.append("")
        out.append(line(cells[id(r)]))
    skipped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            skipped.setdefault((r["label"], r["status"]), []).append(r["shape"])
    out += [f"{label}: {why} [{', '.join(shapes)}]" for (label, why), shapes in skipped.items()]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        logits = next(r["logits_bytes"] for r in rows if r["shape"] == shape)
        out.append(f"  {shape}: L = {logits / 1e6:.1f} MB ({dtype} logits); floor 3 L (logits read forward, read "
                   "again and gradient written backward)")  # fmt: skip
    if rows:
        out.append("")
        out.extend(textwrap.fill(note, width=110) for note in _traffic_notes(device))
    return "\n".join(out)


def _traffic_notes(device: str) -> list[str]:
    where = {
        "meta": "on the meta device: shapes only, no arithmetic; the library takes the route it takes on an "
        "accelerator (CUDA), less its value checks (there device assertions reading the labels once more)",
        "cpu": "on CPU tensors: the host route (unshifted softmax, sequential class sums), on real data",
        "cuda": "on CUDA tensors: what the GPU runs",
    }.get(device, device)
    return [
        f"Counted {where}. Every aten op dispatched over one eager forward+backward step (a TorchDispatchMode) is "
        "one launch (on a GPU roughly a kernel each) reading its tensor inputs and writing its outputs and the "
        "tensors it mutates; views and allocations move nothing and launch nothing; a broadcast input counts its "
        "distinct elements; scatter/gather count the elements their index addresses; a custom op counts the aten "
        "ops its implementation runs. No caches, no fusion: what each op would move to and from memory on its "
        "own. Rows marked [...] come from a kernel implementation's own count of its loads and stores.",
    ]


def _busy_warnings(ok: Sequence[dict]) -> list[str]:
    """One warning per (setting, shape) whose threads waited for a CPU during a large share of a sample."""
    busy: dict[tuple[str, str], float] = {}
    for r in ok:
        if isinstance(r.get("wait_pct"), float) and r["wait_pct"] >= _BUSY_WAIT_PCT:
            where = (r.get("allocator", "default"), r["shape"])
            busy[where] = max(busy.get(where, 0.0), r["wait_pct"])
    return [
        f"WARNING {shape} ({allocator}): threads waited for a CPU during up to {pct:.0f}% of a sample; these "
        "times measure the machine's load as much as the losses: rerun on a quiet machine."
        for (allocator, shape), pct in busy.items()
    ]


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
    return [
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
        _allocator_note(r0, settings),
    ]


def _allocator_note(r0: dict, settings: Sequence[str]) -> str:
    thp_env = children.THP_ENV
    if r0["device"] != "cpu":
        return (
            f"Allocator: one run with {thp_env} unset; on {r0['device']} the CPU allocator's setting does not "
            "concern the measured tensors."
        )
    kernel = r0.get("kernel_thp", "n/a")
    text = {
        "default": f"default = {thp_env} unset in that child (even if the calling shell sets it): PyTorch's CPU "
        "allocator as users get it, large tensors in fresh mappings faulted in 4 KiB pages",
        "thp": f"thp = {thp_env}=1 in that child, for every implementation alike: PyTorch advises each CPU "
        "allocation of 2 MiB or more onto 2 MiB transparent huge pages (about 512x fewer page faults)",
    }
    caveat = {
        "always": "; the kernel's THP mode here is 'always', so default gets huge pages for large aligned extents "
        "too and the two settings differ less",
        "never": "; the kernel's THP mode here is 'never', so the thp setting cannot get huge pages and measures "
        "the same thing as default",
        "madvise": " (kernel THP mode here: 'madvise', huge pages only where asked for)",
    }.get(kernel, f" (kernel THP mode: {kernel})")
    return (
        "Allocator settings: each setting is one child process started with that environment, in which all "
        "implementations are timed together, round-robin, and whose memory children get the same environment: "
        + "; ".join(text.get(a, a) for a in settings)
        + caveat
        + ". Compare rows within a block; across blocks (measured one after the other, so on a shared machine "
        "under different load), one implementation's two times show what page faults cost it."
    )


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Save ``benchmark`` rows as CSV (one row per loss and shape, every key a column)."""
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
