"""The label-map terms of :mod:`monai_gdl_plus._fused` as two Triton kernels, for CUDA tensors.

**Forward** (:func:`label_terms_forward`): a grid over (voxel range, sample); each program goes over its voxels in
blocks of ``BLOCK_N``, loading the logits (upcast to float32, float64 for float64 logits), the labels and the mask
once; the one-hot exists only as ``label == c`` on the tile. It writes its partial sums (one row of C per term) of
the intersection, prediction sum (or squared sum), target volume, and where asked the per-true-class NLL and focal
sums; an ordinary torch reduction adds the rows in float64 (no atomics: the result does not depend on scheduling).
Classes come in tiles of at most :data:`CLASS_TILE`: with one tile the softmax is taken on the tile in registers;
with several, an online softmax across the tiles gives each voxel's log-sum-exp, then a second pass over the tiles
takes the terms (the block is still in L2).

**Backward** (:func:`label_terms_backward`): the same grid; the activation is recomputed from the logits (one
tile: in registers; several: one online pass gives the log-sum-exp and ``sum_k p_k dL/dP_k h(p_k)`` together) and
the gradient is written once, in the logits' dtype. Nothing voxel-sized is saved between the passes: recomputing
the log-sum-exp costs no extra read where the backward must sum over the classes anyway, and the compiled path
(whose custom op returns only the (B, C) terms) runs the very same kernels.

The per-voxel formulas are those of :mod:`monai_gdl_plus._ops` (``nll_from_lse``, ``sigmoid_focal(_grad)``,
``softmax_focal(_grad)``), written again in Triton; the tests hold the two to each other.

**Which path runs** (:func:`use_triton`): the environment variable ``MONAI_GDL_PLUS_KERNELS``, read at each call:
``auto`` (default: Triton for CUDA tensors when ``triton`` imports and the kernels compile, otherwise the torch
path, with a one-line warning if a kernel failed to compile), ``triton`` (always; CPU tensors need
``TRITON_INTERPRET=1``, Triton's interpreter, which is how the tests check the kernels without a GPU), ``torch``.
``triton`` is imported only when the Triton path is asked for, and the kernels' module
(:mod:`monai_gdl_plus._triton_kernels`) on first use. Triton chooses between interpreting and compiling as it
defines a kernel, its standard library's at ``import triton``: ``TRITON_INTERPRET=1`` must be set before that
import (``torch._inductor`` imports ``triton`` too), so the tests set it in ``conftest.py``.

:func:`kernel_traffic` counts the bytes the kernels' loads and stores move, and the launches, per step.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import struct
import types
import warnings
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from monai_gdl_plus._ops import NO_FOCAL, Focal, check_label_route

__all__ = [
    "CLASS_TILE",
    "ENV_VAR",
    "KERNEL_CHOICES",
    "TARGET_PROGRAMS",
    "TILE_ELEMENTS",
    "TRITON_DEVICES",
    "Traffic",
    "kernel_traffic",
    "label_terms_backward",
    "label_terms_forward",
    "triton_label_terms",
    "use_triton",
]

ENV_VAR = "MONAI_GDL_PLUS_KERNELS"
KERNEL_CHOICES = ("auto", "triton", "torch")
# device types where "auto" picks Triton (the tests add "cpu" to run auto mode under the interpreter)
TRITON_DEVICES = {"cuda"}
# the most classes one tile holds (more classes: tiles of this size, online softmax across them)
CLASS_TILE = 128
# logits per tile (classes x voxels): 8 a thread at 8 warps (sm_90 cubins of both kernels then need 80-150
# registers a thread and spill nothing, fp32/fp16/bf16; 4096 spilled)
TILE_ELEMENTS = 2048
# programs aimed at per launch: each program loops over up to 64 voxel blocks, so that the partial sums it writes
# stay a small fraction of the logits (terms / (voxels a program) of their elements) while every SM has work
TARGET_PROGRAMS = 2048
_MAX_ITERS = 64
_FORWARD_WARPS, _BACKWARD_WARPS = 8, 8

_TRITON: Any = None  # the triton module once imported; False when it failed to import
_KERNELS_MODULE = "monai_gdl_plus._triton_kernels"
_COMPILED: dict[tuple, bool] = {}  # compile key -> whether both kernels compiled


def _triton_module() -> Any:
    """``triton``, or None when it does not import (once per process)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton
        except ImportError:
            _TRITON = False
        else:
            _TRITON = triton
    return _TRITON or None


def _interpreting() -> bool:
    """Whether Triton interprets kernels in this process. Triton reads ``TRITON_INTERPRET`` as it defines a kernel,
    its standard library's (``tl.zeros``, ``tl.sum``, ...) when ``triton`` is imported: the setting at that import
    is the one that counts."""
    triton = _triton_module()
    return triton is not None and type(getattr(triton.language, "zeros", None)).__name__ == "InterpretedFunction"


def _choice() -> str:
    value = os.environ.get(ENV_VAR, "auto")
    if value not in KERNEL_CHOICES:
        raise ValueError(f"`{ENV_VAR}` must be one of {KERNEL_CHOICES}, got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------------- launching


class _Config(NamedTuple):
    block_c: int
    c_tiles: int
    block_n: int
    iters: int
    programs: int  # per sample


def _config(b: int, c: int, n: int) -> _Config:
    """Tile sizes for (B, C, N): classes rounded up to a power of two (at most :data:`CLASS_TILE` a tile), voxels
    to fill :data:`TILE_ELEMENTS`, and voxel blocks per program to aim at :data:`TARGET_PROGRAMS` programs."""
    block_c = min(1 << max(0, c - 1).bit_length(), CLASS_TILE)
    block_n = max(16, min(1024, TILE_ELEMENTS // block_c))
    blocks = -(-n // block_n)
    # a power of two, a compile-time constant: Triton 3.6's interpreter cannot loop over a runtime count under
    # NumPy >= 2.4 (``int()`` of its one-element arrays), and few distinct values mean few compiled variants
    iters = 1 << min(_MAX_ITERS.bit_length() - 1, max(1, b * blocks // TARGET_PROGRAMS).bit_length() - 1)
    return _Config(block_c, -(-c // block_c), block_n, iters, -(-blocks // iters))


def _flags(x, mask, ce_weight, softmax, squared, with_ce, focal, cfg):
    """The kernels' compile-time arguments."""
    acc = torch.promote_types(x.dtype, torch.float32)
    tl = _TRITON.language
    return dict(
        SOFTMAX=bool(softmax), SQUARED=bool(squared), WITH_CE=bool(with_ce), FOCAL=int(focal.kind),
        HAS_MASK=mask is not None, HAS_W=ce_weight is not None and bool(with_ce), HAS_ALPHA=focal.alpha is not None,
        BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, C_TILES=cfg.c_tiles, ITERS=cfg.iters,
        TINY=torch.finfo(acc).tiny, ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )  # fmt: skip


def _pair(value: float) -> tuple[float, float]:
    """``value`` as float32 + float32 remainder (Triton passes Python floats as float32)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _slots(with_ce: bool, focal: Focal) -> dict[str, int]:
    """Which row of the partial sums holds which term."""
    slots = {"inter": 0, "psum": 1, "tsum": 2}
    if focal.kind:
        slots["focal"] = len(slots)
    if with_ce:
        slots["nll"] = len(slots)
    return slots


def _device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def label_terms_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    softmax: bool,
    squared: bool,
    with_ce: bool,
    focal: Focal = NO_FOCAL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The terms of :func:`monai_gdl_plus._fused.fused_label_terms` (intersection, prediction sum, target volume,
    summed NLL, focal sums) by the forward kernel, without autograd; in ``promote_types(x.dtype, float32)``."""
    k = _kernels()
    focal = Focal(*focal)
    b, c, n = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    cfg = _config(b, c, n)
    slots = _slots(with_ce, focal)
    x, labels = x.contiguous(), labels.contiguous()
    mask = None if mask is None else mask.contiguous()
    w = None if ce_weight is None or not with_ce else ce_weight.contiguous()
    flags = _flags(x, mask, w, softmax, squared, with_ce, focal, cfg)
    # no autocast_off: nothing below is an op autocast casts (the sums are float32/float64 reductions of float32 data)
    with _device_guard(x):
        part = torch.empty((len(slots), b, cfg.programs, c), dtype=dtype, device=x.device)
        k.forward_kernel[(cfg.programs, b)](
            x, labels, x if mask is None else mask, x if w is None else w, part, c, n, b * cfg.programs * c,
            *_pair(focal.gamma), *_pair(focal.alpha or 0.0), **flags, num_warps=_FORWARD_WARPS,
        )  # fmt: skip
        sums = part.sum(2, dtype=torch.float64)  # (terms, B, C)
        out = sums[: 4 if focal.kind else 3].to(dtype)
        fsum = out[3] if focal.kind else x.new_zeros((b, c), dtype=dtype)
        nll = sums[slots["nll"]].sum().to(dtype) if with_ce else x.new_zeros((), dtype=dtype)
    return out[0], out[1], out[2], nll, fsum


def label_terms_backward(
    x: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    g_inter: torch.Tensor | None,
    g_psum: torch.Tensor | None,
    g_nll: torch.Tensor | None,
    g_focal: torch.Tensor | None,
    softmax: bool,
    squared: bool,
    with_ce: bool,
    focal: Focal = NO_FOCAL,
) -> torch.Tensor:
    """dL/dx (``x``'s dtype and shape) from the upstream gradients of the (B, C) terms and of the 0-d NLL (None:
    zero), by the backward kernel; the activation is recomputed from ``x``."""
    k = _kernels()
    focal = Focal(*focal)
    b, c, n = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    cfg = _config(b, c, n)
    x, labels = x.contiguous(), labels.contiguous()
    mask = None if mask is None else mask.contiguous()
    w = None if ce_weight is None or not with_ce else ce_weight.contiguous()
    flags = _flags(x, mask, w, softmax, squared, with_ce, focal, cfg)
    with _device_guard(x):  # no autocast_off, as in label_terms_forward

        def table(g):  # (B, C) upstream gradient, contiguous in the kernels' dtype
            return x.new_zeros((b, c), dtype=dtype) if g is None else g.to(dtype).expand(b, c).contiguous()

        gi, gp = table(g_inter), table(g_psum)
        gf = table(g_focal) if focal.kind else gi
        gn = (x.new_zeros((), dtype=dtype) if g_nll is None else g_nll.to(dtype)) if with_ce else gi
        grad = torch.empty((b, c, n), dtype=x.dtype, device=x.device)
        k.backward_kernel[(cfg.programs, b)](
            x, labels, x if mask is None else mask, x if w is None else w, gi, gp, gf, gn, grad, c, n,
            *_pair(focal.gamma), *_pair(focal.alpha or 0.0), **flags, num_warps=_BACKWARD_WARPS,
        )  # fmt: skip
    return grad


class _TritonLabelTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, mask, ce_weight, softmax, squared, with_ce, focal):  # noqa: D102
        out = label_terms_forward(x, labels, mask, ce_weight, softmax, squared, with_ce, focal)
        ctx.save_for_backward(x, labels, mask, ce_weight)
        ctx.flags = (softmax, squared, with_ce, focal)
        ctx.mark_non_differentiable(out[2])
        ctx.set_materialize_grads(False)  # absent upstream gradients stay None: no fills
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_inter, g_psum, _g_tsum, g_nll, g_focal):  # noqa: D102
        x, labels, mask, ce_weight = ctx.saved_tensors
        grad = label_terms_backward(x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, *ctx.flags)
        return grad, None, None, None, None, None, None, None


def triton_label_terms(
    x: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    softmax: bool,
    squared: bool = False,
    ce_weight: torch.Tensor | None = None,
    with_ce: bool = False,
    focal: Focal = NO_FOCAL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`monai_gdl_plus._fused.fused_label_terms` by the Triton kernels, differentiable in ``x`` (a second
    backward recomputes; no double backward). Same arguments, same returns."""
    check_label_route(softmax, with_ce, focal, "triton_label_terms")
    return _TritonLabelTerms.apply(x, labels, mask, ce_weight, softmax, squared, with_ce, Focal(*focal))


# ------------------------------------------------------------------------------------------------------ dispatch


def use_triton(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    *,
    softmax: bool = True,
    squared: bool = False,
    with_ce: bool = False,
    focal: Focal = NO_FOCAL,
) -> bool:
    """Whether the label-map terms of ``x`` run as Triton kernels (:data:`ENV_VAR`, read now).

    Raises:
        ValueError: :data:`ENV_VAR` is not one of :data:`KERNEL_CHOICES`; or it is ``triton`` for tensors off
            CUDA without ``TRITON_INTERPRET=1``.
        RuntimeError: it is ``triton`` and ``triton`` does not import.
    """
    choice = _choice()
    if choice == "torch":
        return False
    if choice == "auto":
        if x.device.type not in TRITON_DEVICES or _triton_module() is None:
            return False
        return _compiles(x, mask, ce_weight, softmax, squared, with_ce, Focal(*focal))
    if _triton_module() is None:
        raise RuntimeError(f"`{ENV_VAR}=triton` needs the `triton` package, which does not import here.")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"`{ENV_VAR}=triton` on {x.device.type} tensors needs TRITON_INTERPRET=1 (Triton's interpreter), set "
            "before `triton` is first imported; Triton compiles for CUDA tensors only."
        )
    return True


def _compiles(x, mask, ce_weight, softmax, squared, with_ce, focal) -> bool:
    """Auto mode: both kernels compile for these arguments (once per key; a failure warns once, then the torch path
    runs for that key). The interpreter compiles nothing."""
    if _interpreting():
        return True
    b, c, n = x.shape
    cfg = _config(b, c, n)
    key = (x.device, x.dtype, None if mask is None else mask.dtype, None if ce_weight is None else ce_weight.dtype,
           softmax, squared, with_ce, focal.kind, focal.alpha is None, cfg.block_c, cfg.c_tiles)  # fmt: skip
    ok = _COMPILED.get(key)
    if ok is None:
        try:
            _warm_up(x, mask, ce_weight, softmax, squared, with_ce, focal, cfg)
            ok = True
        except Exception as err:  # any compiler failure: the torch path is always there
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            warnings.warn(
                f"monai_gdl_plus: the Triton kernels did not compile ({type(err).__name__}: {first}); "
                f"using the torch path (set {ENV_VAR}=torch to silence).",
                RuntimeWarning,
                stacklevel=4,
            )
            ok = False
        _COMPILED[key] = ok
    return ok


def _warm_up(x, mask, ce_weight, softmax, squared, with_ce, focal, cfg) -> None:
    """Compile both kernels for these arguments without launching them (Triton's ``warmup``)."""
    k = _kernels()
    b, c, n = x.shape
    w = None if ce_weight is None or not with_ce else ce_weight
    flags = _flags(x, mask, w, softmax, squared, with_ce, focal, cfg)
    dtype = torch.promote_types(x.dtype, torch.float32)
    m, wt = x if mask is None else mask, x if w is None else w
    labels, table = x.new_empty((b, n), dtype=torch.int64), x.new_empty((b, c), dtype=dtype)
    with _device_guard(x):
        k.forward_kernel.warmup(x, labels, m, wt, table, c, n, b * c, 2.0, 0.0, 0.0, 0.0, **flags,
                                num_warps=_FORWARD_WARPS, grid=(1, 1))  # fmt: skip
        k.backward_kernel.warmup(x, labels, m, wt, table, table, table, table, x, c, n, 2.0, 0.0, 0.0, 0.0, **flags,
                                 num_warps=_BACKWARD_WARPS, grid=(1, 1))  # fmt: skip


# ------------------------------------------------------------------------------------------------------- traffic


class Traffic(NamedTuple):
    """Bytes the Triton path's loads and stores move in one forward + backward step, and its kernel launches
    (Triton's and the small torch reductions, fills and casts around them)."""

    read: int
    written: int
    launches: int
    logits: int  # L, the logits' bytes

    @property
    def total_l(self) -> float:
        """Read + written, as a multiple of L."""
        return (self.read + self.written) / self.logits


def kernel_traffic(
    b: int,
    c: int,
    n: int,
    dtype: torch.dtype = torch.float32,
    *,
    softmax: bool = True,
    squared: bool = False,
    with_ce: bool = False,
    focal: int = 0,
    mask: bool = False,
    ce_weight: bool = False,
) -> Traffic:
    """:class:`Traffic` of one forward + backward of :func:`triton_label_terms` on (B, C, N) logits of ``dtype``
    (``mask``: with a float32 ignore mask; ``ce_weight``: with CE class weights), counted from the kernels' loads and
    stores of valid elements as launched (tile sizes of :func:`_config`), plus the torch ops on the partial sums.
    Gathers from (C,) and (B, C) tables are counted as loads although they mostly hit in cache.

    Examples:
        >>> from monai_gdl_plus._triton import kernel_traffic
        >>> t = kernel_traffic(2, 16, 128**3)
        >>> round(t.total_l, 2), t.launches
        (3.32, 6)
    """
    cfg = _config(b, c, n)
    esize = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    logits, voxels = b * c * n, b * n
    one_pass = cfg.c_tiles == 1 or not softmax
    w = ce_weight and with_ce
    per_voxel = 8 + (4 if mask else 0)  # int64 labels, float32 mask
    blocks = b * -(-n // cfg.block_n)
    terms = 3 + (1 if focal else 0) + (1 if with_ce else 0)
    # forward: logits once (twice with several class tiles under a softmax), labels, mask, CE weight gathers;
    # partial rows written (several tiles: read back and rewritten per voxel block), reduced, cast
    reads = (1 if one_pass else 2) * logits * esize + voxels * (per_voxel + (4 if w else 0))
    part = terms * b * cfg.programs * c * acc
    rmw = 0 if cfg.c_tiles == 1 else terms * blocks * c * acc
    reads += part + rmw + terms * b * c * 8
    writes = part + rmw + terms * b * c * (8 + acc)
    launches = 1 + 1 + 1 + (2 if with_ce else 1) + (0 if focal else 1)  # kernel, sum, cast, nll, zeros
    # backward: logits once (twice with several class tiles under a softmax), labels, mask, gathers of the true
    # class's dL/dI (and dL/dF, the CE weight), the (C,) rows of dL/dP (and dL/dF) per block; gradient written once
    reads += (1 if one_pass else 2) * logits * esize + voxels * (per_voxel + acc * (1 + (focal == 2)) + (4 if w else 0))
    reads += blocks * c * acc * (1 + (focal == 1)) * (1 if one_pass else 2)
    writes += logits * esize
    launches += 1  # the kernel (plus a fill for each upstream gradient autograd passes as None)
    return Traffic(reads, writes, launches, logits * esize)


# ------------------------------------------------------------------------------------------------------- kernels


def _kernels() -> types.ModuleType:
    """The kernels' module, :mod:`monai_gdl_plus._triton_kernels` (imported on first use)."""
    if _triton_module() is None:
        raise RuntimeError(f"the Triton path needs the `triton` package, which does not import here ({ENV_VAR}).")
    return importlib.import_module(_KERNELS_MODULE)
