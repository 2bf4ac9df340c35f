"""Memory traffic of one forward+backward step: the bytes each implementation reads and writes, and its launches,
counted from the aten ops it dispatches (``gdl-plus bench --traffic``).

What is counted (:class:`TrafficCounter`, a ``TorchDispatchMode`` over the step):

- **Every aten op dispatched is one launch** (on a GPU roughly a kernel each; a few aten ops launch more than one,
  or none). It **reads** its tensor inputs and **writes** its fresh tensor outputs and the tensors it mutates
  (in-place ``self``, ``out=`` arguments; the schema's write annotations say which). An ``out=`` argument and the
  ``self`` of an op that overwrites it whole (:data:`WRITE_ONLY`: ``copy_``, ``fill_``, ``zero_``) are written, not
  read. A tensor passed twice to one op is read once.
- **Views move nothing and launch nothing**: an op all of whose outputs alias an input without writing it (the
  schema's alias annotations, ``view``/``expand``/``permute``/``select``/``slice``/``detach``/``alias``/...), an output
  that shares an input's storage although the schema does not say so (``_unsafe_view``), and ops that touch no
  tensor. Allocations (:data:`ALLOCATIONS`: ``empty`` and its kin) write nothing and launch nothing either.
- **A tensor's bytes are its distinct elements'**: the product of the sizes along axes with a non-zero stride (a
  broadcast/expanded input is read once from memory, its repeats being cache hits), capped at its storage.
- **Indexed writes** (:data:`INDEXED`: ``scatter_``/``scatter_add_``/``scatter_reduce_``/``index_add_``) touch as
  many elements of ``self`` as their index (``index_add_``: their source) has, capped at ``self``, not all of it;
  ``scatter_`` writes them, the others read and write them. Likewise ``gather`` (:data:`GATHERS`) reads as many
  elements of its input as its index has. Other indexing kernels (``nll_loss``, ``index_select``) are counted
  reading their whole input: an upper bound.
- **Custom ops** (any namespace but ``aten``/``prims``, e.g. ``monai_gdl_plus::label_terms`` and its backward) are
  opaque to the dispatcher, but their implementations run aten ops: the counter runs the implementation under
  itself and counts those inner ops, i.e. what runs on the device. A custom op whose implementation dispatches no
  aten op (a kernel launched from Python, or the fake implementation on the ``meta`` device) is one launch reading
  its inputs and writing its outputs. Kernels launched from Python beside aten ops (Triton's) are invisible to a
  dispatch mode: our losses are therefore counted on their torch path (:data:`KERNELS_ENV` set to ``torch`` while
  counting), and the kernels' traffic comes from their own count (the kernel rows below).

What is not counted: the host's work (a ``.item()`` is one launch reading one element, the wait is not counted),
caches (every op reads from and writes to memory, no fusion), and anything ``torch.compile`` would fuse: the step
is counted eagerly.

Devices (``--traffic-device``): ``meta`` (default) runs no arithmetic, only shapes, so any shape is counted in
milliseconds; the library takes there the route it takes on an accelerator (CUDA), without its value checks (on
CUDA those are device assertions that read the labels once more). ``cpu`` counts the host route on real data
(unshifted softmax, sequential class sums); ``cuda`` counts what a GPU runs. Logits (``--traffic-dtype``, a key
of :data:`TRAFFIC_DTYPES`) are float32, or float16/bfloat16 as a network under autocast hands them to the loss; L is
their bytes in that dtype, so an implementation computing in float32 moves a larger multiple of L in half precision.

Rows (:func:`traffic_rows`): each implementation of :mod:`~monai_gdl_plus.app.bench.registry` at each shape, counted
as above; and for our losses, one more row from every function in :data:`KERNEL_SOURCES` (``register_kernel_source``):
a function ``(B, C, N, dtype, flags) -> (bytes_read, bytes_written, launches)`` reporting a kernel implementation's
own loads, stores and launches (the Triton kernels' count, which a dispatch mode cannot see). :func:`kernel_sources`
also takes the library's own such function when it has one (:data:`LIBRARY_KERNEL_TRAFFIC`).

Examples:
    >>> a, b = torch.ones(256), torch.ones(256)
    >>> with TrafficCounter() as counter:
    ...     c = (a + b).view(16, 16)
    >>> counter.result()
    Traffic(bytes_read=2048, bytes_written=1024, launches=1)
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from monai_gdl_plus.app.bench import registry
from monai_gdl_plus.options import check_option

__all__ = [
    "ALLOCATIONS", "GATHERS", "INDEXED", "KERNELS_ENV", "KERNEL_SOURCES", "LIBRARY_KERNEL_TRAFFIC", "LOSS_FLAGS",
    "TRAFFIC_DEVICES", "TRAFFIC_DTYPES", "WRITE_ONLY", "KernelSource", "Traffic", "TrafficCounter", "count_step",
    "kernel_sources", "kernels", "register_kernel_source", "tensor_bytes", "traffic_rows",
]  # fmt: skip

TRAFFIC_DEVICES = ("meta", "cpu", "cuda")
# the logits' dtypes counted (float16/bfloat16: what a network under autocast hands the loss)
TRAFFIC_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# ops that only allocate (or change metadata): no bytes, no launch. The schema cannot say "uninitialised".
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_"})
# in-place ops that overwrite their `self` without reading it (the schema marks `self` written, not how)
WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"})
# in-place ops writing only the elements their index/source addresses: op -> (argument counted, self read too)
INDEXED = {"scatter_": ("index", False), "scatter_add_": ("index", True), "scatter_reduce_": ("index", True),
           "index_add_": ("source", True)}  # fmt: skip
# ops reading only the elements of `self` their index addresses: op -> the argument whose elements are read
GATHERS = {"gather": "index"}
_OP_NAMESPACES = ("aten", "prims")
# the library's switch between its Triton kernels and its torch path (read when a loss runs)
KERNELS_ENV = "MONAI_GDL_PLUS_KERNELS"
# where the library publishes its kernels' own count, (module, function): looked up, never required. A public
# module: the application reaches the library through those only. The function is called as
# ``fn(B, C, N, dtype, **flags)`` (flags: LOSS_FLAGS' keys) and returns (read, written, launches, ...).
LIBRARY_KERNEL_TRAFFIC = ("monai_gdl_plus.functional", "kernel_traffic")

# what each of our losses asks of a per-voxel kernel (what a KernelSource receives as `flags`)
LOSS_FLAGS: dict[str, dict[str, Any]] = {
    "ours-dice": {"softmax": True, "squared": False, "with_ce": False, "focal": 0},
    "ours-gdl": {"softmax": True, "squared": False, "with_ce": False, "focal": 0},
    "ours-dicece": {"softmax": True, "squared": False, "with_ce": True, "focal": 0},
    "ours-dicefocal": {"softmax": True, "squared": False, "with_ce": False, "focal": 1},  # MONAI's sigmoid form
    "ours-tversky": {"softmax": True, "squared": False, "with_ce": False, "focal": 0},
}

KernelSource = Callable[[int, int, int, torch.dtype, Mapping[str, Any]], tuple[int, int, int]]
# name -> (row label suffix, function): kernel implementations whose count comes from themselves
KERNEL_SOURCES: dict[str, tuple[str, KernelSource]] = {}


@dataclass(frozen=True)
class Traffic:
    """Bytes read, bytes written and launches of one counted step."""

    bytes_read: int
    bytes_written: int
    launches: int


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes of ``t``'s distinct elements: sizes multiplied over the axes with a non-zero stride (a broadcast
    axis is one element), capped at ``t``'s storage."""
    if t.numel() == 0:
        return 0
    distinct = math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st != 0)
    try:
        stored = t.untyped_storage().nbytes() // t.element_size()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): its elements
        stored = distinct
    return min(distinct, stored) * t.element_size()


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _identity(t: torch.Tensor) -> tuple:
    return (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _tensors(value: object) -> list[torch.Tensor]:
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


class TrafficCounter(TorchDispatchMode):
    """Counts the bytes read and written and the launches of the aten ops dispatched while it is active (the rules
    are the module's). ``ops`` holds the launches per op name (``aten.mul_.Tensor``), ``op_bytes`` their bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_read = 0
        self.bytes_written = 0
        self.launches = 0
        self.ops: Counter[str] = Counter()
        self.op_bytes: Counter[str] = Counter()

    def result(self) -> Traffic:
        """What has been counted so far."""
        return Traffic(self.bytes_read, self.bytes_written, self.launches)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func.namespace not in _OP_NAMESPACES:
            return self._custom(func, args, kwargs)
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        return out

    def _custom(self, func, args, kwargs):
        """Run a custom op's implementation under this counter, so that its aten ops are counted; one opaque launch
        if it dispatches none."""
        keys = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
        seen = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        tensors = _tensors((args, kwargs))
        for i, t in enumerate(tensors):
            seen = torch._C._dispatch_keys(t) if i == 0 else seen | torch._C._dispatch_keys(t)
        before = self.launches
        with self:
            out = func.redispatch(seen & keys, *args, **kwargs)
        if self.launches == before:
            self._add(str(func), self._unique_bytes(tensors), sum(tensor_bytes(t) for t in _tensors(out)))
        return out

    def _unique_bytes(self, tensors: Iterable[torch.Tensor]) -> int:
        return sum(tensor_bytes(t) for t in {_identity(t): t for t in tensors}.values())

    def _add(self, name: str, read: int, written: int) -> None:
        self.bytes_read += read
        self.bytes_written += written
        self.launches += 1
        self.ops[name] += 1
        self.op_bytes[name] += read + written

    def _count(self, func, args, kwargs, out) -> None:
        schema = func._schema
        name = func.name().split("::")[-1].split(".")[0]
        if name in ALLOCATIONS:
            return
        values = dict(zip((a.name for a in schema.arguments), args, strict=False)) | kwargs
        read: list[torch.Tensor] = []
        mutated: list[torch.Tensor] = []
        gathered = 0
        for arg in schema.arguments:
            tensors = _tensors(values.get(arg.name))
            writes = arg.alias_info is not None and arg.alias_info.is_write
            if writes:
                mutated += tensors
            if name in GATHERS and arg.name == "self":
                gathered += min(tensor_bytes(tensors[0]), _tensors(values.get(GATHERS[name]))[0].numel()
                                * tensors[0].element_size())  # fmt: skip
            elif not (writes and (arg.is_out or name in WRITE_ONLY or name in INDEXED)):
                read += tensors
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        fresh = [
            t for r, t in zip(schema.returns, _outputs(out), strict=False)
            if r.alias_info is None and _storage_key(t) not in inputs
        ]  # fmt: skip
        if not mutated and not fresh and (_outputs(out) or not read):
            return  # a view (or an op on no tensor): nothing moves, nothing launches
        written = sum(tensor_bytes(t) for t in mutated) + sum(tensor_bytes(t) for t in fresh)
        extra_read = gathered
        if name in INDEXED and mutated:
            source, reads_self = INDEXED[name]
            touched = min(tensor_bytes(mutated[0]), _tensors(values.get(source))[0].numel() * mutated[0].element_size())
            written = touched + sum(tensor_bytes(t) for t in fresh)
            extra_read += touched if reads_self else 0
        self._add(str(func), self._unique_bytes(read) + extra_read, written)


def _outputs(out: object) -> list[torch.Tensor]:
    """The op's returns, one entry per schema return (a list return counted as its tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    return _tensors(out)


def count_step(fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Traffic:
    """The traffic of ``fn(x, y).backward()`` (``x`` requiring grad), inputs made outside the count, with the
    library on its torch path (:data:`KERNELS_ENV` ``=torch``, restored after)."""
    with kernels("torch"), TrafficCounter() as counter:
        fn(x, y).backward()
    return counter.result()


@contextlib.contextmanager
def kernels(choice: str) -> Iterator[None]:
    """``MONAI_GDL_PLUS_KERNELS=choice`` (:data:`KERNELS_ENV`) for the block, restored after (the losses read it at
    each call)."""
    before = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = choice
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = before


def register_kernel_source(name: str, label: str, fn: KernelSource) -> None:
    """Add a kernel implementation whose traffic comes from its own count: its rows are our losses' labels with
    `` [<label>]``; ``fn(B, C, N, dtype, flags)`` returns ``(bytes_read, bytes_written, launches)`` of one
    forward+backward step (``flags``: :data:`LOSS_FLAGS` of the loss)."""
    KERNEL_SOURCES[name] = (label, fn)


def kernel_sources() -> dict[str, tuple[str, KernelSource]]:
    """:data:`KERNEL_SOURCES`, plus the library's own count (:data:`LIBRARY_KERNEL_TRAFFIC`) when it has one."""
    sources = dict(KERNEL_SOURCES)
    module_name, attr = LIBRARY_KERNEL_TRAFFIC
    try:
        fn = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        fn = None
    if callable(fn) and "kernels" not in sources:
        sources["kernels"] = ("Triton kernels", _keyword_flags(fn))
    return sources


def _keyword_flags(fn: Callable[..., Sequence[int]]) -> KernelSource:
    """The library's count (flags as keywords, a longer tuple returned) as a :data:`KernelSource`."""
    return lambda b, c, n, dtype, flags: tuple(fn(b, c, n, dtype, **flags))[:3]  # type: ignore[return-value]


def _inputs(shape: Sequence[int], device: str, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, *spatial = shape
    if device == "meta":
        x = torch.empty(tuple(shape), dtype=dtype, device="meta")
        return x.requires_grad_(), torch.empty((b, 1, *spatial), dtype=torch.int64, device="meta")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g).to(device, dtype).requires_grad_()
    return x, torch.randint(0, c, (b, 1, *spatial), generator=g).to(device)


def _row(
    key: str, label: str, source: str, shape: Sequence[int], device: str, dtype: str, t: Traffic | None, status: str
) -> dict:
    logits = math.prod(shape) * TRAFFIC_DTYPES[dtype].itemsize
    nan = math.nan
    read, written, launches = (nan, nan, nan) if t is None else (t.bytes_read, t.bytes_written, t.launches)
    return {
        "loss": key, "label": label, "source": source, "shape": "x".join(map(str, shape)), "device": device,
        "dtype": dtype, "status": status, "logits_bytes": logits, "bytes_read": read, "bytes_written": written,
        "launches": launches, "read_L": read / logits, "written_L": written / logits,
        "total_L": (read + written) / logits,
    }  # fmt: skip


def traffic_rows(
    shapes: Iterable[Sequence[int]], losses: Iterable[str] | None = None, device: str = "meta",
    dtype: str = "float32", seed: int = 0, log: Callable[[str], None] | None = None,
) -> list[dict]:  # fmt: skip
    """Count one forward+backward step of each implementation at each shape (logits of ``dtype``, an int64 label
    map).

    Args:
        shapes: logits shapes (B, C, *spatial), already parsed.
        losses: keys or groups of :data:`~monai_gdl_plus.app.bench.LOSSES` (default all).
        device: one of :data:`TRAFFIC_DEVICES` (see the module).
        dtype: the logits' dtype, a key of :data:`TRAFFIC_DTYPES`; L is the logits' bytes in it.
        seed: seed of the random inputs (``cpu``/``cuda``).
        log: called with a progress line per row, or None.

    Returns:
        One dict per (shape, implementation), kernel sources after the torch rows of our losses, with keys
        ``loss``, ``label``, ``source`` (``"aten ops"`` or the kernel source's name), ``shape``, ``device``,
        ``dtype``, ``status`` (``"ok"``, ``"not installed (...)"``, ``"error: ..."``), ``logits_bytes`` (L),
        ``bytes_read``, ``bytes_written``, ``launches``, ``read_L``, ``written_L``, ``total_L`` (NaN when missing).

    Raises:
        ValueError: a bad device, dtype or loss name, or ``device="cuda"`` without CUDA.
    """
    device = check_option("device", device, TRAFFIC_DEVICES)
    dtype = check_option("dtype", dtype, tuple(TRAFFIC_DTYPES))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but torch.cuda.is_available() is False here.")
    keys = registry.resolve_losses(losses)
    sources = kernel_sources()
    say = log or (lambda _m: None)
    rows = []
    for shape in shapes:
        for key in keys:
            label = registry.SPECS[key].label
            try:
                fn = registry.build_loss(key)
                x, y = _inputs(shape, device, seed, TRAFFIC_DTYPES[dtype])
                rows.append(_row(key, label, "aten ops", shape, device, dtype, count_step(fn, x, y), "ok"))
            except registry.Unavailable as e:
                rows.append(_row(key, label, "aten ops", shape, device, dtype, None, str(e)))
            except Exception as e:  # one failing implementation must not hide the others' rows
                rows.append(_row(key, label, "aten ops", shape, device, dtype, None, registry.error_text(e)))
            say(f"traffic {rows[-1]['shape']} {label}: {rows[-1]['status']}")
            for name, (suffix, source) in sources.items() if key in LOSS_FLAGS else ():
                b, c, *spatial = shape
                where = (key, f"{label} [{suffix}]", name, shape, device, dtype)
                try:
                    counted = source(b, c, math.prod(spatial), TRAFFIC_DTYPES[dtype], dict(LOSS_FLAGS[key]))
                    rows.append(_row(*where, Traffic(*(int(v) for v in tuple(counted)[:3])), "ok"))
                except Exception as e:
                    rows.append(_row(*where, None, registry.error_text(e)))
    return rows
