"""One-hot-free per-class terms for label-map targets with an analytic, in-place backward.

:func:`fused_label_terms` computes, from logits ``x`` (B, C, N) and integer labels (B, N):

- ``I[b, c] = sum_n m[b, n] p[b, c, n] [labels[b, n] == c]``  (intersection),
- ``P[b, c] = sum_n m[b, n] p[b, c, n]`` (or ``p**2``),
- optionally ``nll = sum_n m[b, n] w[labels] (-log p[b, labels, n])`` (softmax cross entropy, summed),

with ``p = softmax(x)`` or ``sigmoid(x)`` and ``m`` the ignore mask. The Dice/GDL combination stays in ordinary
autograd on the (B, C) terms; only the per-voxel part is hand-written. Memory: the forward keeps the activation
(1x the logits' bytes) and the backward overwrites it with the gradient, so forward+backward peaks near 1x the
logits above the inputs (MONAI: 3x; its softmax, float one-hot and their product). The backward works chunk by
chunk over voxels so its temporaries stay small.

A second backward through the same graph (``retain_graph=True``, ``gradcheck``) recomputes the activation from
the saved logits; double backward (``create_graph=True``) is not supported (``once_differentiable``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["class_sums", "fused_label_terms"]

# elements per chunk of temporaries: cache-sized on CPU; on accelerators large enough to keep kernels busy and
# small enough (64 MiB in float32) that the temporaries stay far below the logits' size
_CHUNK_ELEMENTS = {"cpu": 1 << 19}
_DEFAULT_CHUNK = 1 << 24


_BLOCK = 4096  # voxels per partial histogram on accelerators


def class_sums(values: torch.Tensor, labels: torch.Tensor, num_classes: int, blocked: bool) -> torch.Tensor:
    """``out[b, c] = sum(values[b, n] for n with labels[b, n] == c)`` in float64, without a one-hot.

    CPU: one float64 scatter-add (it adds sequentially, so float32 would drift on large volumes). Accelerators
    (``blocked``): atomic adds onto only C counters serialise, so each block of ``_BLOCK`` voxels gets its own
    float32 histogram, and the (B, blocks, C) partial sums are added in float64.
    """
    b, n = labels.shape
    if not blocked:
        out = torch.zeros(b, num_classes, dtype=torch.float64, device=labels.device)
        return out.scatter_add_(1, labels, values.double())
    blocks = -(-n // _BLOCK)
    block_of = torch.arange(n, device=labels.device) // _BLOCK
    idx = torch.add(labels, block_of, alpha=num_classes)  # block * C + label
    partial = torch.zeros(b, blocks * num_classes, dtype=torch.float32, device=labels.device)
    partial.scatter_add_(1, idx, values.float())
    return partial.view(b, blocks, num_classes).sum(1, dtype=torch.float64)


def _step(p: torch.Tensor) -> int:
    """Voxels per chunk of temporaries (see ``_CHUNK_ELEMENTS``)."""
    b, c = p.shape[:2]
    return max(1, _CHUNK_ELEMENTS.get(p.device.type, _DEFAULT_CHUNK) // max(1, b * c))


def _forward_chunks(
    x: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    softmax: bool,
    squared: bool,
    dtype: torch.dtype,
    with_lse: bool,
):
    """Activation ``p`` written chunk by chunk into one buffer, plus what the terms need while a chunk is hot.

    Returns ``p`` (B, C, N), the true-class probability (B, N), the masked prediction sums (B, C) accumulated in
    float64, and the log-sum-exp per voxel (B, N) for the CE term (or None). Going over the voxels in
    cache-sized chunks beats ``torch.softmax`` over the channel axis on CPU and yields ``lse = max + log(sum)``
    for free.
    """
    b, c, n = x.shape
    p = torch.empty((b, c, n), dtype=dtype, device=x.device)
    true_p = torch.empty((b, n), dtype=dtype, device=x.device)
    psum = torch.zeros((b, c), dtype=torch.float64, device=x.device)
    lse = torch.empty((b, n), dtype=dtype, device=x.device) if with_lse else None
    step = _step(p)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xc, pc = x[:, :, lo:hi], p[:, :, lo:hi]
        if softmax:
            m = xc.amax(1, keepdim=True).to(dtype)
            torch.sub(xc, m, out=pc)
            pc.exp_()
            tot = pc.sum(1, keepdim=True)
            pc.div_(tot)
            if lse is not None:
                lse[:, lo:hi] = (m + tot.log()).squeeze(1)
        else:
            pc.copy_(xc).sigmoid_()
        true_p[:, lo:hi] = pc.gather(1, labels[:, None, lo:hi]).squeeze(1)
        qc = pc * pc if squared else pc
        psum += qc.sum(-1) if mask is None else torch.bmm(qc, mask[:, lo:hi, None]).squeeze(-1)
    return p, true_p, psum.to(dtype), lse


class _FusedLabelTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, mask, ce_weight, softmax: bool, squared: bool, with_ce: bool):  # noqa: D102
        dtype = torch.promote_types(x.dtype, torch.float32)
        b, c = x.shape[:2]
        p, true_p, psum, lse = _forward_chunks(x, labels, mask, softmax, squared, dtype, with_ce)
        blocked = x.device.type != "cpu"
        inter = class_sums(true_p if mask is None else true_p * mask, labels, c, blocked).to(dtype)
        counted = torch.ones_like(true_p) if mask is None else mask
        tsum = class_sums(counted, labels, c, blocked).to(dtype)
        nll = torch.zeros((), dtype=dtype, device=x.device)
        if with_ce:
            logp_t = x.gather(1, labels[:, None]).squeeze(1).to(dtype) - lse
            wv = mask if ce_weight is None else ce_weight[labels] * (1.0 if mask is None else mask)
            nll = -(logp_t * wv).sum() if wv is not None else -logp_t.sum()
        ctx.save_for_backward(x, labels, mask, ce_weight, true_p)
        # kept off save_for_backward: the backward overwrites it, and must drop it so autograd can take the
        # buffer as the gradient without a copy
        ctx.p = p
        ctx.flags = (softmax, squared, with_ce)
        ctx.mark_non_differentiable(tsum)
        return inter, psum, tsum, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, g_inter, g_psum, _g_tsum, g_nll):  # noqa: D102
        x, labels, mask, ce_weight, true_p = ctx.saved_tensors
        softmax, squared, with_ce = ctx.flags
        p, ctx.p = ctx.p, None
        if p is None:  # a second backward: the first one turned the saved activation into its gradient
            p = _forward_chunks(x, labels, mask, softmax, False, true_p.dtype, False)[0]  # same rounding as forward
        grad = _backward_in_place(
            p, labels, mask, ce_weight, true_p, g_inter, g_psum, g_nll, softmax, squared, with_ce
        )
        return grad.to(x.dtype), None, None, None, None, None, None


def _zeros_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _backward_in_place(p, labels, mask, ce_weight, true_p, g_inter, g_psum, g_nll, softmax, squared, with_ce):
    """Overwrite ``p`` with dL/dx.

    With ``q[c, n] = dL/dp[c, n] = m_n (gP_c h(p) + gI_c [c == t_n])`` (``h = 1``, or ``2p`` when squared) and the
    CE part ``g_nll m_n w_t (p_c - [c == t_n])``, the softmax gradient is
    ``p_c (q_c - sum_k p_k q_k) + CE part``; the sigmoid gradient is ``p (1 - p) q``.
    """
    b, c, n = p.shape
    g_psum = _zeros_if_none(g_psum, p[:, :, 0]).to(p.dtype)
    g_inter = _zeros_if_none(g_inter, p[:, :, 0]).to(p.dtype)
    gi_t = g_inter.gather(1, labels)  # (B, N): gI at the true class
    m = mask
    # per-voxel terms
    ce_v = None
    if softmax:
        if with_ce and g_nll is not None:
            ce_v = g_nll.to(p.dtype) * (torch.ones_like(true_p) if ce_weight is None else ce_weight[labels].to(p.dtype))
            if m is not None:
                ce_v = ce_v * m
    step = max(1, _step(p) // 2)  # half-size chunks: the backward's temporaries are what sets the peak
    beta = g_psum[:, :, None]
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        pc = p[:, :, lo:hi]
        mc = None if m is None else m[:, None, lo:hi]
        if softmax:
            if squared:
                hq = pc * (2.0 * beta)  # gP_c h(p_c)
                s_c = (hq * pc).sum(1, keepdim=True) + (gi_t[:, None, lo:hi] * true_p[:, None, lo:hi])
            else:
                hq = beta
                s_c = torch.bmm(g_psum[:, None, :], pc) + gi_t[:, None, lo:hi] * true_p[:, None, lo:hi]
            factor = hq - s_c
            if mc is not None:
                factor = factor * mc
            if ce_v is not None:
                factor = factor + ce_v[:, None, lo:hi]
            pc.mul_(factor)
        else:
            hq = pc * (2.0 * beta) if squared else beta
            factor = (1.0 - pc) * hq
            if mc is not None:
                factor = factor * mc
            pc.mul_(factor)
    # true-class corrections: + m gI_t p_t (softmax) or + m gI_t p_t (1 - p_t) (sigmoid); CE: - g_nll m w_t
    corr = gi_t.mul_(true_p)  # in place: gi_t is not needed any more, and (B, N) buffers add up at C ~ 100
    if not softmax:
        corr.sub_(corr * true_p)
    if m is not None:
        corr.mul_(m)
    if softmax and with_ce and g_nll is not None:
        corr.sub_(ce_v)
    p.scatter_add_(1, labels[:, None], corr[:, None])
    return p


def fused_label_terms(
    x: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    softmax: bool,
    squared: bool = False,
    ce_weight: torch.Tensor | None = None,
    with_ce: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersection, prediction sum, target volume (each (B, C); the last without gradient) and the summed
    softmax NLL (0-d; 0 unless ``with_ce``).

    Args:
        x: logits (B, C, N), any float dtype (sums in float32 or float64).
        labels: (B, N) int64 in [0, C) (ignored voxels already mapped into range and masked out).
        mask: (B, N) float mask or None.
        softmax: softmax over channels if True, else an element-wise sigmoid.
        squared: prediction sum of ``p**2``.
        ce_weight: per-class CE weights (C,) or None.
        with_ce: also return the summed, masked, weighted NLL (softmax only).
    """
    if with_ce and not softmax:
        raise ValueError("`with_ce=True` needs `softmax=True` in fused_label_terms.")
    return _FusedLabelTerms.apply(x, labels, mask, ce_weight, softmax, squared, with_ce)
