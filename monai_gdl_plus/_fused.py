"""One-hot-free per-class terms for label-map targets with an analytic, in-place backward.

:func:`fused_label_terms` computes, from logits ``x`` (B, C, N) and integer labels (B, N):

- ``I[b, c] = sum_n m[b, n] p[b, c, n] [labels[b, n] == c]``  (intersection),
- ``P[b, c] = sum_n m[b, n] p[b, c, n]`` (or ``p**2``),
- optionally ``nll = sum_n m[b, n] w[labels] (-log p[b, labels, n])`` (softmax cross entropy, summed),

with ``p = softmax(x)`` or ``sigmoid(x)`` and ``m`` the ignore mask. The Dice/GDL combination stays in ordinary
autograd on the (B, C) terms; only the per-voxel part is hand-written. Memory: the forward keeps the activation
(1x the logits' bytes, as exponentials plus one reciprocal sum per voxel for the softmax) and the backward
overwrites it with the gradient, so forward+backward peaks near 1x the logits above the inputs (MONAI: 3x; its
softmax, float one-hot and their product). Both passes go chunk by chunk over voxels, so that every other
per-voxel quantity lives for one cache-sized chunk.

Time on CPU: one ``exp`` per logit and about five passes over cache-resident chunks, plus the kernel's first touch
of the one fresh logits-sized buffer (the gradient-to-be); PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` backs it (and every
other large CPU tensor) with huge pages, far fewer page faults, a process-wide setting left to the user.

A second backward through the same graph (``retain_graph=True``, ``gradcheck``) recomputes the activation from
the saved logits; double backward (``create_graph=True``) is not supported (``once_differentiable``).

Autocast: everything here runs with autocast off (:func:`autocast_off`), so sums and ``bmm`` stay in float32 or
float64 whatever autocast would cast them to (a float16 per-class soft volume overflows past 65504).

``torch.compile``: the same kernels are registered as two custom ops (``monai_gdl_plus::label_terms`` and its
backward, :func:`_label_terms_op`), opaque to the compiler, so a compiled loss keeps the one-hot-free path and its
memory. A custom op may not overwrite a tensor that the compiler saved, so there the backward recomputes the
activation from the logits into the buffer it returns as the gradient (one more ``exp`` per logit, same peak).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from monai_gdl_plus._ops import (
    NO_FOCAL,
    Focal,
    autocast_off,
    check_label_route,
    chunk_voxels,
    class_sums,
    nll_from_lse,
    on_host,
    sigmoid_focal_grad,
    sigmoid_focal_label_sums,
    softmax_focal,
    softmax_focal_grad,
    wide,
)
from monai_gdl_plus._triton import label_terms_backward, label_terms_forward, triton_label_terms, use_triton

__all__ = ["fused_label_terms", "soft_class_sums"]

# CPU softmax without the max pass: exp(x) is taken as is when each voxel's sum of exponentials lands in
# [1 / 2^k, 2^k] (k below; logits up to about +-66 in float32), otherwise that chunk is redone with the max
# subtracted, and so is the rest of the volume. Inside that range neither exp(x) nor its reciprocal sum overflows
# or goes subnormal, so the probabilities carry the same rounding as the shifted form.
_SAFE_SUM_LOG2 = {torch.float32: 96, torch.float64: 768}


def _forward_chunks(
    x: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    softmax: bool,
    squared: bool,
    dtype: torch.dtype,
    with_ce: bool,
    focal: Focal = NO_FOCAL,
):
    """The activation, kept as one logits-sized buffer, and the (B, C) terms, taken while each chunk is hot.

    Returns ``e`` (B, C, N), ``r`` (B, N) or None, the true class's probability ``p_t`` (B, N), and the
    intersection, prediction sum, target volume (each (B, C)), summed NLL (0-d) and focal sums (B, C), all in
    ``dtype``.

    Softmax: ``e`` holds the exponentials ``exp(x - s)`` (``s`` 0 or the voxel's max logit) and ``r = 1 / sum_c e``
    so that ``p = e * r``; leaving the division to the consumers saves a pass over the logits. Sigmoid: ``e = p``
    and ``r`` is None. Going over the voxels in cache-sized chunks beats ``torch.softmax`` over the channel axis on
    CPU, and yields the log-sum-exp for the CE term for free. Only ``e``, ``r`` and ``p_t`` are voxel-sized: every
    other per-voxel quantity lives for one chunk.
    """
    b, c, n = x.shape
    dev, blocked = x.device, not on_host(x.device)
    zeros = functools.partial(torch.zeros, dtype=torch.float64, device=dev)
    tsum = class_sums(mask, labels, c, blocked)  # before the big buffer: its float64 copy of the mask is freed
    # the sigmoid-form focal term needs only the logits: summed before the big buffer exists, so that its
    # chunk temporaries add nothing to the peak
    fsum = sigmoid_focal_label_sums(x, labels, mask, focal, blocked) if focal.kind == 1 else None
    e = torch.empty((b, c, n), dtype=dtype, device=dev)
    r = torch.empty((b, n), dtype=dtype, device=dev) if softmax else None
    pt = torch.empty((b, 1, n), dtype=dtype, device=dev)  # the true class's probability
    # the float64 accumulators: intersection, prediction sum, NLL, focal sums
    sums = _Sums(zeros((b, c)), zeros((b, c)), zeros(()), zeros((b, c)) if fsum is None else fsum)
    # a range check is free only on the host: elsewhere the softmax always subtracts the max
    exp = _Exp(not blocked and dtype in _SAFE_SUM_LOG2, 2.0 ** _SAFE_SUM_LOG2.get(dtype, 0),
               torch.ones((b, 1, c), dtype=dtype, device=dev))  # fmt: skip
    step = chunk_voxels(e)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xc, ec, lab = x[:, :, lo:hi].to(dtype), e[:, :, lo:hi], labels[:, None, lo:hi]  # fp16: exp in float32
        mc = None if mask is None else mask[:, None, lo:hi]
        if softmax:
            assert r is not None  # allocated for the softmax
            exp, tp, wv = _softmax_chunk(xc, ec, lab, mc, r[:, None, lo:hi], pt[:, :, lo:hi], exp, sums,
                                         ce_weight, squared, with_ce, focal, blocked)  # fmt: skip
        else:
            torch.sigmoid(xc, out=ec)
            tp, wv = torch.gather(ec, 1, lab, out=pt[:, :, lo:hi]), mc
        qc = ec * ec if squared else ec
        sums.psum.add_(qc.sum(-1) if wv is None else torch.bmm(wv, qc.transpose(1, 2)).squeeze(1))
        sums.inter.add_(class_sums((tp if mc is None else tp * mc).squeeze(1), lab.squeeze(1), c, blocked))
    out = (sums.inter, sums.psum, tsum, sums.nll, sums.focal)
    return (e, r, pt.squeeze(1), *(t.to(dtype) for t in out))


class _Sums(NamedTuple):
    """The forward's float64 accumulators, added to in place chunk by chunk."""

    inter: torch.Tensor
    psum: torch.Tensor
    nll: torch.Tensor
    focal: torch.Tensor


class _Exp(NamedTuple):
    """How the softmax takes its exponentials: ``unshifted`` (no max pass) while every voxel's sum of exponentials
    has stayed inside [1 / bound, bound]; ``ones`` (B, 1, C) sums over classes as a gemv (faster than sum(1))."""

    unshifted: bool
    bound: float
    ones: torch.Tensor


def _softmax_chunk(xc, ec, lab, mc, rc, ptc, exp: _Exp, sums: _Sums, ce_weight, squared, with_ce, focal, blocked):
    """One chunk of the softmax: ``ec`` = the exponentials, ``rc`` = their reciprocal sum, ``ptc`` = the true class's
    probability, and the chunk's NLL and softmax-form focal sums added to ``sums``. Returns the (possibly switched)
    :class:`_Exp`, ``p_t`` and the per-voxel weight of the prediction sum (``r`` or ``r**2``, masked)."""
    shift = None
    if exp.unshifted:
        torch.exp(xc, out=ec)
        tot = torch.bmm(exp.ones, ec)
        lo_tot, hi_tot = torch.aminmax(tot)
        if not (1.0 / exp.bound <= float(lo_tot) and float(hi_tot) <= exp.bound):  # NaN fails too
            exp = _Exp(False, exp.bound, exp.ones)  # the rest of the volume likely has such logits too
    if not exp.unshifted:
        shift = xc.amax(1, keepdim=True)
        torch.sub(xc, shift, out=ec)
        ec.exp_()
        tot = torch.bmm(exp.ones, ec)
    torch.reciprocal(tot, out=rc)
    tp = torch.gather(ec, 1, lab, out=ptc).mul_(rc)
    wv = rc * rc if squared else rc
    if with_ce or focal.kind == 2:  # -log p_t = lse - x_t, lse = s + log(sum_c e)
        lse = tot.log_() if shift is None else tot.log_().add_(shift)
        nlp = nll_from_lse(lse, xc.gather(1, lab))
        if with_ce:
            cw = mc if ce_weight is None else ce_weight[lab] if mc is None else ce_weight[lab] * mc
            sums.nll.add_((nlp if cw is None else nlp * cw).sum(dtype=torch.float64))
        if focal.kind == 2:
            fv = softmax_focal(-nlp, lab, focal)
            sums.focal.add_(class_sums((fv if mc is None else fv * mc).squeeze(1), lab.squeeze(1), ec.shape[1],
                                       blocked))  # fmt: skip
    return exp, tp, wv if mc is None else wv * mc


class _FusedLabelTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, mask, ce_weight, softmax: bool, squared: bool, with_ce: bool, focal=NO_FOCAL):  # noqa: D102
        dtype = torch.promote_types(x.dtype, torch.float32)
        focal = Focal(*focal)
        with autocast_off(x.device):
            e, r, pt, inter, psum, tsum, nll, fsum = _forward_chunks(
                x, labels, mask, ce_weight, softmax, squared, dtype, with_ce, focal
            )
        ctx.save_for_backward(x, labels, mask, ce_weight)
        # kept off save_for_backward: the backward overwrites them (``e`` becomes the gradient, which autograd can
        # then take without a copy; ``p_t`` the per-voxel true-class term) and drops them
        ctx.buffers = (e, r, pt)
        ctx.flags = (softmax, squared, with_ce, focal)
        ctx.mark_non_differentiable(tsum)
        return inter, psum, tsum, nll, fsum

    @staticmethod
    @once_differentiable
    def backward(ctx, g_inter, g_psum, _g_tsum, g_nll, g_focal):  # noqa: D102
        x, labels, mask, ce_weight = ctx.saved_tensors
        buffers, ctx.buffers = ctx.buffers, None
        # None: a second backward; the first one turned the saved buffers into its gradient
        grad = _gradient(x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, *ctx.flags, buffers=buffers)
        return grad, None, None, None, None, None, None, None


def _gradient(
    x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, softmax, squared, with_ce, focal, buffers=None
):
    """dL/dx in ``x``'s dtype, written over ``buffers`` (``e, r, p_t`` of the forward) or, without them, over the
    activation recomputed from ``x`` (the same shifts as the forward: they depend on ``x`` only)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with autocast_off(x.device):
        if buffers is None:
            buffers = _forward_chunks(x, labels, mask, None, softmax, False, dtype, False)[:3]
        g_nll = g_nll if softmax and with_ce else None
        grad = _backward_in_place(
            *buffers, labels, mask, ce_weight, g_inter, g_psum, g_nll, squared, x, g_focal, Focal(*focal)
        )
        return grad.to(x.dtype)


# the compile-time twin of _FusedLabelTerms: functional custom ops (outputs fresh, inputs untouched)
_OP_ARGS = "Tensor x, Tensor labels, Tensor? mask, Tensor? ce_weight"
_OP_FLAGS = "bool softmax, bool squared, bool with_ce, int focal=0, float gamma=2., float? alpha=None"


@torch.library.custom_op(
    "monai_gdl_plus::label_terms",
    mutates_args=(),
    schema=f"({_OP_ARGS}, {_OP_FLAGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _label_terms_op(x, labels, mask, ce_weight, softmax, squared, with_ce, focal=0, gamma=2.0, alpha=None):
    spec = Focal(focal, gamma, alpha)
    if use_triton(x, mask, ce_weight, softmax=softmax, squared=squared, with_ce=with_ce, focal=spec):  # CUDA: Triton
        out = label_terms_forward(x, labels, mask, ce_weight, softmax, squared, with_ce, spec)
        return tuple(t.clone() for t in out)  # views of one buffer: an op's outputs may not alias each other
    dtype = torch.promote_types(x.dtype, torch.float32)
    with autocast_off(x.device):
        out = _forward_chunks(x, labels, mask, ce_weight, softmax, squared, dtype, with_ce, Focal(focal, gamma, alpha))
    # the logits-sized activation is dropped here and recomputed by the backward; outputs contiguous, as the fake
    return tuple(t.contiguous() for t in out[3:])


@_label_terms_op.register_fake
def _(x, labels, mask, ce_weight, softmax, squared, with_ce, focal=0, gamma=2.0, alpha=None):
    dtype = torch.promote_types(x.dtype, torch.float32)
    b, c = x.shape[:2]
    sums = [x.new_empty((b, c), dtype=dtype) for _ in range(4)]
    return (*sums[:3], x.new_empty((), dtype=dtype), sums[3])


@torch.library.custom_op(
    "monai_gdl_plus::label_terms_backward",
    mutates_args=(),
    schema=f"({_OP_ARGS}, Tensor g_inter, Tensor g_psum, Tensor g_nll, Tensor g_focal, {_OP_FLAGS}) -> Tensor",
)
def _label_terms_backward_op(
    x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, softmax, squared, with_ce, focal=0, gamma=2.0,
    alpha=None,
):  # fmt: skip
    flags = (softmax, squared, with_ce, Focal(focal, gamma, alpha))
    if use_triton(x, mask, ce_weight, softmax=softmax, squared=squared, with_ce=with_ce, focal=flags[3]):
        return label_terms_backward(x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, *flags)
    return _gradient(x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, *flags)


@_label_terms_backward_op.register_fake
def _(x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, softmax, squared, with_ce, focal=0, gamma=2.0,
      alpha=None):  # fmt: skip
    return torch.empty_like(x)


def _op_setup_context(ctx, inputs, output):
    x, labels, mask, ce_weight, *flags = inputs
    ctx.save_for_backward(x, labels, mask, ce_weight)
    ctx.flags = flags
    ctx.mark_non_differentiable(output[2])


def _op_backward(ctx, g_inter, g_psum, _g_tsum, g_nll, g_focal):
    x, labels, mask, ce_weight = ctx.saved_tensors
    b, c = x.shape[:2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    g_inter = x.new_zeros((b, c), dtype=dtype) if g_inter is None else g_inter
    g_psum = x.new_zeros((b, c), dtype=dtype) if g_psum is None else g_psum
    g_nll = x.new_zeros((), dtype=dtype) if g_nll is None else g_nll
    g_focal = x.new_zeros((b, c), dtype=dtype) if g_focal is None else g_focal
    grad = _label_terms_backward_op(x, labels, mask, ce_weight, g_inter, g_psum, g_nll, g_focal, *ctx.flags)
    return grad, *([None] * (len(ctx.flags) + 3))


_label_terms_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _zeros_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _backward_in_place(
    e, r, pt, labels, mask, ce_weight, g_inter, g_psum, g_nll, squared, x=None, g_focal=None, focal=NO_FOCAL
):
    """Overwrite ``e`` (see :func:`_forward_chunks`; softmax when ``r`` is given, else sigmoid) with dL/dx, and
    ``pt`` (the true class's probability, (B, N)) with the true-class correction.

    With ``q[c, n] = dL/dp[c, n] = m_n (gP_c h(p) + gI_c [c == t_n])`` (``h = 1``, or ``2p`` when squared) and the
    CE part ``g_nll m_n w_t (p_c - [c == t_n])``, the softmax gradient is ``p_c (q_c - sum_k p_k q_k) + CE part``;
    the sigmoid gradient is ``p (1 - p) q``. Per voxel, the true class gets the correction
    ``k = m gI_t p_t - g_nll m w_t`` (softmax) or ``m gI_t p_t (1 - p_t)`` (sigmoid), added by a scatter. For the
    softmax the dense part is ``e_c (gP_c h(p_c) u - w)`` with ``u = m r`` and
    ``w = u sum_k p_k gP_k h(p_k) + r k``, so that one chunk-sized temporary is all each chunk allocates.

    Focal term (gradient ``gF`` of its (B, C) sums): the softmax form, a function of the true class's
    log-probability ``L``, adds ``gF_t m dv/dL`` to ``k`` (its gradient ``dv/dL ([c == t] - p_c)`` has the CE
    part's shape); the sigmoid form, a function of the logits ``x`` themselves, adds
    ``gF_c m d(negative)/dx_c`` to every element and ``gF_t m d(positive - negative)/dx_t`` at the true class,
    both after the softmax chain.
    """
    softmax = r is not None
    g_psum = _zeros_if_none(g_psum, e[:, :, 0]).to(e.dtype)
    g_inter = _zeros_if_none(g_inter, e[:, :, 0]).to(e.dtype)
    # the per-voxel true-class correction k, in place of p_t (one lookup of gI over the whole volume)
    corr = pt if softmax else pt.addcmul_(pt, pt, value=-1.0)  # p_t, or p_t (1 - p_t)
    corr.mul_(g_inter.gather(1, labels))
    if mask is not None:
        corr.mul_(mask)
    if g_nll is not None:
        ce_v = g_nll.to(e.dtype) if ce_weight is None else g_nll.to(e.dtype) * ce_weight.to(e.dtype)[labels]
        corr.sub_(ce_v if mask is None else ce_v * mask)
    n = e.shape[-1]
    step = max(1, chunk_voxels(e) // 4)  # quarter-size chunks: the backward's temporaries are what sets the peak
    g_focal = None if not focal.kind else _zeros_if_none(g_focal, e[:, :, 0]).to(e.dtype)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        ec, lab, kc = e[:, :, lo:hi], labels[:, None, lo:hi], corr[:, None, lo:hi]
        mc = None if mask is None else mask[:, None, lo:hi]
        gf_t = None if g_focal is None else g_focal.gather(1, lab.squeeze(1))[:, None]  # the true class's
        if softmax:
            assert r is not None
            ec.mul_(_softmax_chunk_factor(ec, lab, kc, mc, r[:, None, lo:hi], g_psum, squared, gf_t, focal))
        else:
            hq = ec * (2.0 * g_psum[:, :, None]) if squared else g_psum[:, :, None]
            factor = (1.0 - ec) * hq
            ec.mul_(factor if mc is None else factor * mc)
        if focal.kind == 1:
            assert g_focal is not None and gf_t is not None
            _add_sigmoid_focal_grad(ec, kc, x[:, :, lo:hi].to(e.dtype), lab, mc, g_focal, gf_t, focal)
        ec.scatter_add_(1, lab, kc)
    return e


def _softmax_chunk_factor(ec, lab, kc, mc, rc, g_psum, squared, gf_t, focal):
    """The factor that turns one chunk's exponentials ``ec`` into the softmax part of dL/dx,
    ``e_c (gP_c h(p_c) u - w)``; the softmax-form focal term's true-class part added to ``kc`` first."""
    if focal.kind == 2:
        lp = torch.gather(ec, 1, lab).mul_(rc).clamp_min_(torch.finfo(ec.dtype).tiny).log_()
        dv = softmax_focal_grad(lp, lab, focal).mul_(gf_t)
        kc.add_(dv if mc is None else dv * mc)
    u = rc if mc is None else rc * mc
    beta = g_psum[:, :, None]
    if squared:
        hq = ec * (2.0 * beta)  # gP_c h(p_c) / r
        w = (hq * ec).sum(1, keepdim=True).mul_(u * rc)  # u sum_k p_k gP_k h(p_k) / r
        return hq.mul_(u * rc).sub_(w.add_(kc).mul_(rc))
    w = torch.bmm(g_psum[:, None, :], ec).mul_(u)  # u sum_k p_k gP_k / r
    return torch.addcmul(w.add_(kc).mul_(rc).neg_(), beta, u)


def _add_sigmoid_focal_grad(ec, kc, xc, lab, mc, g_focal, gf_t, focal) -> None:
    """The sigmoid-form focal term's gradient, a function of the logits ``xc`` themselves: every element's negative
    part added to ``ec``, the true class's (positive minus negative) part to ``kc``."""
    dense = sigmoid_focal_grad(xc, 0.0, focal).mul_(g_focal[:, :, None])
    ec.add_(dense if mc is None else dense.mul_(mc))
    xt = xc.gather(1, lab)
    fix = sigmoid_focal_grad(xt, 1.0, focal).sub_(sigmoid_focal_grad(xt, 0.0, focal))
    kc.add_(fix.mul_(gf_t) if mc is None else fix.mul_(gf_t).mul_(mc))


def fused_label_terms(
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
    """Intersection, prediction sum, target volume (each (B, C); the last without gradient), the summed
    softmax NLL (0-d; 0 unless ``with_ce``) and the masked focal sums (B, C) (0 unless ``focal.kind``).

    Args:
        x: logits (B, C, N), any float dtype (sums in float32 or float64).
        labels: (B, N) int64 in [0, C) (ignored voxels already mapped into range and masked out).
        mask: (B, N) float mask or None.
        softmax: softmax over channels if True, else an element-wise sigmoid.
        squared: prediction sum of ``p**2``.
        ce_weight: per-class CE weights (C,) or None.
        with_ce: also return the summed, masked, weighted NLL (softmax only).
        focal: the focal term to sum (:class:`Focal`; its softmax form needs ``softmax``).
    """
    check_label_route(softmax, with_ce, focal, "fused_label_terms")
    if not torch.compiler.is_compiling() and use_triton(
        x, mask, ce_weight, softmax=softmax, squared=squared, with_ce=with_ce, focal=focal
    ):  # the Triton kernels (CUDA, or forced): monai_gdl_plus._triton
        return triton_label_terms(
            x, labels, mask, softmax=softmax, squared=squared, ce_weight=ce_weight, with_ce=with_ce, focal=focal
        )
    if torch.compiler.is_compiling():
        return _label_terms_op(x, labels, mask, ce_weight, softmax, squared, with_ce, *focal)
    return _FusedLabelTerms.apply(x, labels, mask, ce_weight, softmax, squared, with_ce, focal)


# ------------------------------------------------------------------------- the Wasserstein loss's soft class sums


def soft_class_sums(x: torch.Tensor, labels: torch.Tensor, bins: int) -> torch.Tensor:
    """``S[b, k, c] = sum_{n: labels[b, n] = k} softmax(x)[b, c, n]``, float64 (B, bins, C), of logits (B, C, N) and
    labels (B, N) in [0, bins), one-hot-free and with the analytic backward ``dx = p (g - sum_c p g)``,
    ``g[b, c, n] = dS[b, y_n, c]``: the per-voxel part of
    :func:`monai_gdl_plus.functional.generalized_wasserstein_dice_plus_loss`.

    One custom op (``monai_gdl_plus::soft_class_sums``, its backward another), eager and compiled alike: under
    ``torch.compile`` it stays opaque rather than unrolled chunk by chunk. Memory: the softmax is taken whole (one
    logits-sized buffer, freed after the forward, recomputed by the backward, which overwrites it with the gradient
    it returns); every other per-voxel quantity lives for one cache-sized chunk, and nothing but the logits and
    labels is saved, so forward+backward peaks near 1x the logits. Class sums: on the host a float32 scatter per
    chunk along the voxels (the label map expanded, not copied), added up in float64; elsewhere :func:`class_sums`
    (blocked partial histograms) per chunk.
    """
    return _soft_class_sums_op(x, labels, bins)


@torch.library.custom_op("monai_gdl_plus::soft_class_sums", mutates_args=())
def _soft_class_sums_op(x: torch.Tensor, labels: torch.Tensor, bins: int) -> torch.Tensor:
    b, c, n = x.shape
    with autocast_off(x.device):
        p = torch.softmax(wide(x), 1)
        soft = torch.zeros((b, c, bins), dtype=torch.float64, device=x.device)
        host = on_host(x.device)
        channels = torch.arange(c, device=x.device)[:, None] * bins  # accelerators' bin c * bins + y_n
        for lo, hi in _quarter_chunks(x):
            pc, lab = p[:, :, lo:hi], labels[:, None, lo:hi]
            if host:
                part = torch.zeros((b, c, bins), dtype=pc.dtype, device=x.device)
                soft += part.scatter_add_(2, lab.expand(pc.shape), pc)
            else:
                idx = torch.add(lab, channels).reshape(b, -1)
                soft += class_sums(pc.reshape(b, -1), idx, c * bins).view(b, c, bins)
    return soft.transpose(1, 2).contiguous()  # (B, bins, C), laid out as the fake's


@_soft_class_sums_op.register_fake
def _(x: torch.Tensor, labels: torch.Tensor, bins: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], bins, x.shape[1]), dtype=torch.float64)


@torch.library.custom_op("monai_gdl_plus::soft_class_sums_backward", mutates_args=())
def _soft_class_sums_backward_op(x: torch.Tensor, labels: torch.Tensor, grad_soft: torch.Tensor) -> torch.Tensor:
    with autocast_off(x.device):
        p = torch.softmax(wide(x), 1)  # becomes the gradient, chunk by chunk
        table = grad_soft.transpose(1, 2).to(p.dtype).contiguous()  # [b, c, k] = dS[b, k, c]
        for lo, hi in _quarter_chunks(x):
            pc, lab = p[:, :, lo:hi], labels[:, None, lo:hi]
            g = table.gather(2, lab.expand(pc.shape))
            pc.mul_(g.sub_((g * pc).sum(1, keepdim=True)))
    return p.to(x.dtype)


@_soft_class_sums_backward_op.register_fake
def _(x: torch.Tensor, labels: torch.Tensor, grad_soft: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _soft_setup_context(ctx, inputs, output):
    x, labels, _ = inputs
    ctx.save_for_backward(x, labels)


def _soft_backward(ctx, grad_soft):
    x, labels = ctx.saved_tensors
    return _soft_class_sums_backward_op(x, labels, grad_soft), None, None


_soft_class_sums_op.register_autograd(_soft_backward, setup_context=_soft_setup_context)


def _quarter_chunks(x: torch.Tensor) -> list[tuple[int, int]]:
    """Voxel ranges of quarter-size chunks (``_ops.chunk_voxels``) of a (B, C, N) tensor: their temporaries stay in
    cache."""
    n = x.shape[-1]
    step = max(1, chunk_voxels(x) // 4)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]
