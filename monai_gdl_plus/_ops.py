"""What every other library module builds on: the device policy, value checks, class sums and the per-voxel formulas.

- **Device policy.** :data:`HOST_DEVICES` are where a value check costs no sync and class sums run sequentially; other
  devices get asynchronous device assertions, the always-shifted softmax and blocked class sums. The tests empty it to
  run the accelerator code on CPU tensors (:data:`FUSED_ROUTE` likewise turns the fused label-map route off).
  :func:`autocast_off` keeps every sum in float32 or wider under autocast; :func:`chunk_voxels` sizes the chunks of the
  fused route's temporaries.
- **Value checks.** :func:`checks_enabled` (never while ``torch.compile`` traces, never on the meta device) and
  :func:`value_check` (a ValueError on the host or with ``validate``, a device assertion elsewhere).
- **Class sums.** :func:`class_sums`: ``out[b, c] = sum of values[b, n] over labels[b, n] == c``, without a one-hot.
- **Per-voxel formulas**, one torch definition each, used by the plain route (through autograd) and the fused route
  (with their derivatives): the focal loss in MONAI ``FocalLoss``'s sigmoid form (:func:`sigmoid_focal`) and softmax
  form (:func:`softmax_focal`), and the softmax cross entropy of the true class (:func:`nll_from_lse`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "BLOCK",
    "CHUNK_ELEMENTS",
    "FUSED_ROUTE",
    "HOST_DEVICES",
    "LOW_PRECISION",
    "NO_FOCAL",
    "CrossEntropy",
    "Focal",
    "activate",
    "as_count",
    "autocast_off",
    "check_label_route",
    "checks_enabled",
    "chunk_voxels",
    "class_sums",
    "counted_weight",
    "cross_entropy_sums",
    "focal_class_sums",
    "nll_from_lse",
    "on_host",
    "plain_terms",
    "SoftDice",
    "sigmoid_focal",
    "sigmoid_focal_grad",
    "sigmoid_focal_label_sums",
    "softmax_focal",
    "softmax_focal_grad",
    "soft_sums",
    "value_check",
    "wide",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)
# devices where a value check costs no sync and class sums are sequential (bincount); others: device assertions,
# the always-shifted softmax and blocked class sums. The tests empty it to run those paths on CPU tensors.
HOST_DEVICES = {"cpu"}
# label maps with a softmax or sigmoid take the fused route; the tests turn it off to compare with the plain route
FUSED_ROUTE = True
# devices with an asynchronous device-side assertion (the CPU one is reached with HOST_DEVICES emptied)
_ASYNC_ASSERT_DEVICES = ("cuda", "cpu")
# elements per chunk of the fused route's temporaries: cache-sized on CPU; on accelerators large enough to keep
# kernels busy and small enough (64 MiB in float32) that the temporaries stay far below the logits' size
CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK = 1 << 24
BLOCK = 4096  # voxels per partial histogram of the blocked class sums


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device``'s type (a no-op context where autocast does not exist)."""
    # not `if torch.amp.is_autocast_available(...)`: dynamo in torch 2.8 cannot trace that call (a graph break, an
    # error under fullgraph); it builds `torch.autocast` itself without running the constructor's device check
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast (e.g. meta): nothing to turn off
        return contextlib.nullcontext()


def on_host(device: torch.device) -> bool:
    """Whether a value check costs no sync on ``device`` and class sums can be sequential (:data:`HOST_DEVICES`)."""
    return device.type in HOST_DEVICES


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is float16 or bfloat16 (the plain route computes there), else ``x`` itself."""
    return x.float() if x.dtype in LOW_PRECISION else x


def as_count(n: float, like: torch.Tensor) -> torch.Tensor:
    """``n`` as a 0-d float tensor on ``like``'s device, by a fill (no host-to-device copy per step)."""
    return torch.full((), float(n), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


def chunk_voxels(x: torch.Tensor) -> int:
    """Voxels per chunk of a (B, C, N) tensor's temporaries (:data:`CHUNK_ELEMENTS`)."""
    b, c = x.shape[:2]
    return max(1, CHUNK_ELEMENTS.get(x.device.type, _DEFAULT_CHUNK) // max(1, b * c))


def check_label_route(softmax: bool, with_ce: bool, focal: Focal, where: str) -> None:
    """The label-map routes' flag rule: CE and the softmax-form focal term need the softmax (ValueError naming
    ``where``, the function called)."""
    if with_ce and not softmax:
        raise ValueError(f"`with_ce=True` needs `softmax=True` in {where}.")
    if focal.kind == 2 and not softmax:
        raise ValueError(f"the softmax-form focal term needs `softmax=True` in {where}.")


def checks_enabled(x: torch.Tensor) -> bool:
    """Value checks that read data: never while torch.compile traces, never on the meta device."""
    return x.device.type != "meta" and not torch.compiler.is_compiling()


def value_check(ok: torch.Tensor, message: str, validate: bool) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (a 0-d bool tensor) holds, without a host sync off the host.

    Host tensors are checked eagerly (no sync to speak of). Elsewhere the check is an asynchronous device assertion
    (a RuntimeError with ``message`` at the next sync) unless ``validate=True``, which makes it a full (synchronising)
    check with the readable ValueError. Skipped while ``torch.compile`` traces and on the meta device.
    """
    if not checks_enabled(ok):
        return
    if on_host(ok.device) or validate:
        if not bool(ok):
            raise ValueError(message)
    elif ok.device.type in _ASYNC_ASSERT_DEVICES:
        torch._assert_async(ok, message)


def class_sums(
    values: torch.Tensor | None, labels: torch.Tensor, num_classes: int, blocked: bool | None = None
) -> torch.Tensor:
    """``out[b, c] = sum(values[b, n] for n with labels[b, n] == c)`` in float64, without a one-hot; ``values``
    None counts voxels. ``blocked`` None: blocked everywhere but on the host (``labels``' device).

    Host: a float64 scatter-add, which adds each sample's voxels in order (float32 would drift on large volumes),
    into rows padded to whole cache lines; voxel counts take an integer ``bincount`` per sample (labels are
    range-checked on the host before this) unless ``torch.compile`` traces. Accelerators (``blocked``): atomic adds
    onto only C counters serialise, so each block of :data:`BLOCK` voxels gets its own float32 (float64 for float64
    values) histogram, and the (B, blocks, C) partial sums are added in float64.
    """
    b, n = labels.shape
    if blocked is None:
        blocked = not on_host(labels.device)
    if not blocked and values is None and not torch.compiler.is_compiling():
        return torch.stack([torch.bincount(row, minlength=num_classes) for row in labels]).double()
    if not blocked:
        src = torch.ones(labels.shape, dtype=torch.float64, device=labels.device) if values is None else values.double()
        # each sample's row padded to whole 64-byte cache lines: threads adding into different samples' sums would
        # otherwise share a line (3-8x slower for B > 1 and few classes)
        out = torch.zeros(b, -(-num_classes // 8) * 8, dtype=torch.float64, device=labels.device)
        return out.scatter_add_(1, labels, src)[:, :num_classes]
    if values is None:
        values = torch.ones(labels.shape, device=labels.device)
    blocks = -(-n // BLOCK)
    block_of = torch.arange(n, device=labels.device) // BLOCK
    idx = torch.add(labels, block_of, alpha=num_classes)  # block * C + label
    acc = torch.promote_types(values.dtype, torch.float32)  # float64 values keep float64 partial sums
    partial = torch.zeros(b, blocks * num_classes, dtype=acc, device=labels.device)
    partial.scatter_add_(1, idx, values.to(acc))
    return partial.view(b, blocks, num_classes).sum(1, dtype=torch.float64)


# ------------------------------------------------------------------------------------------- per-voxel formulas


class Focal(NamedTuple):
    """A focal term (Lin et al. 2017): ``kind`` 0 none, 1 the sigmoid form of every (class, voxel)
    (:func:`sigmoid_focal`), 2 the softmax form of the true class (:func:`softmax_focal`)."""

    kind: int = 0
    gamma: float = 2.0
    alpha: float | None = None


NO_FOCAL = Focal()


def nll_from_lse(lse: torch.Tensor, x_true: torch.Tensor) -> torch.Tensor:
    """Softmax cross entropy of the true class, ``-log p_t = lse - x_t``, from the log-sum-exp of a voxel's logits
    and its true class's logit (the plain route takes ``lse = logsumexp(x)``, the fused route its chunk's sum)."""
    return lse - x_true


def sigmoid_focal(x: torch.Tensor, t: torch.Tensor | float, focal: Focal) -> torch.Tensor:
    """MONAI ``FocalLoss``'s sigmoid form per element, ``a_t exp(gamma logsigmoid(z)) BCE(x, t)`` with
    ``z = x (1 - 2t)`` and ``a_t = alpha t + (1 - alpha)(1 - t)`` (1 without alpha); ``t`` a target tensor, or
    0.0 / 1.0 for every element (then ``BCE = softplus(z)``, the exact form)."""
    z = x * (1.0 - 2.0 * t)
    bce = F.softplus(z) if isinstance(t, float) else F.softplus(x) - x * t
    v = torch.exp(focal.gamma * F.logsigmoid(z)) * bce
    if focal.alpha is None:
        return v
    return v * (focal.alpha * t + (1.0 - focal.alpha) * (1.0 - t))


def sigmoid_focal_grad(x: torch.Tensor, t: float, focal: Focal) -> torch.Tensor:
    """d :func:`sigmoid_focal` / dx for ``t`` 0.0 or 1.0: ``(1 - 2t) a s**gamma (gamma (1 - s) softplus(z) + s)``
    with ``s = sigmoid(z)``, ``z = x (1 - 2t)``."""
    z = x * (1.0 - 2.0 * t)
    s = torch.sigmoid(z)
    d = (F.softplus(z) * (1.0 - s) * focal.gamma + s) * s.pow(focal.gamma)
    a = 1.0 if focal.alpha is None else focal.alpha * t + (1.0 - focal.alpha) * (1.0 - t)
    return d * (a * (1.0 - 2.0 * t))


def _class_alpha(classes: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.where(classes == 0, 1.0 - alpha, alpha)  # MONAI: 1 - alpha for the background, alpha otherwise


def softmax_focal(lp: torch.Tensor, classes: torch.Tensor, focal: Focal) -> torch.Tensor:
    """MONAI ``FocalLoss``'s softmax form, ``-a (1 - p)**gamma log p`` of log-probabilities ``lp`` of the classes
    ``classes`` (broadcastable to ``lp``; ``a``: 1 - alpha for class 0, alpha otherwise, 1 without alpha)."""
    omp = (1.0 - lp.exp()).clamp_min(torch.finfo(lp.dtype).tiny)
    v = -omp.pow(focal.gamma) * lp
    return v if focal.alpha is None else v * _class_alpha(classes, focal.alpha)


def softmax_focal_grad(lp: torch.Tensor, classes: torch.Tensor, focal: Focal) -> torch.Tensor:
    """d :func:`softmax_focal` / d lp: ``a (gamma (1 - p)**(gamma - 1) p lp - (1 - p)**gamma)``."""
    p = lp.exp()
    omp = (1.0 - p).clamp_min(torch.finfo(lp.dtype).tiny)
    v = focal.gamma * omp.pow(focal.gamma - 1.0) * p * lp - omp.pow(focal.gamma)
    return v if focal.alpha is None else v * _class_alpha(classes, focal.alpha)


def sigmoid_focal_label_sums(
    x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, focal: Focal, blocked: bool | None = None
) -> torch.Tensor:
    """(B, C) float64 sums over the counted voxels of :func:`sigmoid_focal` against a label map, without a one-hot:
    every (class, voxel) as a negative, then the true class's correction (positive minus negative) by a class
    histogram; in quarter-size chunks computed in ``x``'s float32-or-wider dtype. Differentiable by autograd."""
    b, c, n = x.shape
    fsum = torch.zeros((b, c), dtype=torch.float64, device=x.device)
    step = max(1, chunk_voxels(x) // 4)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xc, lab = wide(x[:, :, lo:hi]), labels[:, None, lo:hi]
        mc = None if mask is None else mask[:, None, lo:hi].to(xc.dtype)
        f0 = sigmoid_focal(xc, 0.0, focal)
        # element-wise, not bmm: a matmul's backward would run in float16 where backward is called under autocast
        fsum = fsum + (f0 if mc is None else f0 * mc).sum(-1)
        xt = xc.gather(1, lab)
        fix = sigmoid_focal(xt, 1.0, focal) - sigmoid_focal(xt, 0.0, focal)
        fsum = fsum + class_sums((fix if mc is None else fix * mc).squeeze(1), lab.squeeze(1), c, blocked)
    return fsum


# ------------------------------------------------------------------ the plain route: each term through autograd


class SoftDice(NamedTuple):
    """The soft Dice sums the plain route takes: the activation (``sigmoid``, ``softmax`` over channels or
    ``other_act``, else none), ``squared`` (``sum(p**2)``, ``sum(g**2)``) and MONAI's ``soft_label`` form."""

    sigmoid: bool = False
    softmax: bool = False
    other_act: Callable | None = None
    squared: bool = False
    soft_label: bool = False


class CrossEntropy(NamedTuple):
    """The cross-entropy term the plain route sums: per-channel BCE-with-logits (``sigmoid``, or one channel) or the
    softmax CE; ``weight`` CE's class weights (C,) or BCE's ``pos_weight``; ``label_smoothing`` the CE's."""

    sigmoid: bool = False
    weight: torch.Tensor | None = None
    label_smoothing: float = 0.0


def plain_terms(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    dice: SoftDice | None,
    ce: CrossEntropy | None = None,
    focal: Focal = NO_FOCAL,
) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """The plain route's sums of logits ``x`` (B, C, N) against labels (B, N) or a dense target (B, C, N), each term
    only if asked for: ``dice`` (:class:`SoftDice`) the soft sums ``(I, P, G, volumes)`` (:func:`soft_sums`),
    ``ce`` the cross entropy's sum and mean denominator (:func:`cross_entropy_sums`), ``focal.kind`` the focal sums
    (B, C) (:func:`focal_class_sums`)."""
    sums = None
    if dice is not None:
        probs = activate(x, dice.sigmoid, dice.softmax, dice.other_act)
        sums = soft_sums(probs, labels, target, mask, dice.squared, dice.soft_label)
    return (sums, None if ce is None else cross_entropy_sums(x, labels, target, mask, ce),
            focal_class_sums(x, labels, target, mask, focal) if focal.kind else None)  # fmt: skip


def activate(x: torch.Tensor, sigmoid: bool, softmax: bool, other_act: Callable | None = None) -> torch.Tensor:
    """The activation along the channel axis, computed in float32 or wider (:func:`wide`)."""
    x = wide(x)
    if sigmoid:
        return torch.sigmoid(x)
    if softmax:
        return torch.softmax(x, 1)
    return x if other_act is None else wide(other_act(x))


def soft_sums(
    probs: torch.Tensor,
    labels: torch.Tensor | None,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    squared: bool = False,
    soft_label: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(I, P, G, volumes)`` (B, C) of probabilities (B, C, N) against labels (B, N) (never one-hot: the true class's
    probability is gathered and added per class) or a dense target (B, C, N), masked by ``mask`` (B, N). The volumes
    ``sum(g)`` differ from ``G`` only for squared soft labels. Element-wise sums, not einsum: a matmul's backward
    would run in float16 where backward is called under autocast."""
    num_ch = probs.shape[1]
    if labels is not None:
        true_p = probs.gather(1, labels[:, None]).squeeze(1)  # (B, N): probability of the true class
        inter = class_sums(true_p if mask is None else true_p * mask, labels, num_ch).to(probs.dtype)
        tsum = class_sums(mask, labels, num_ch).to(probs.dtype)  # mask None: voxel counts
        q = probs * probs if squared else probs
        return inter, q.sum(-1) if mask is None else (q * mask[:, None]).sum(-1), tsum, tsum
    assert target is not None  # one of the two
    if mask is not None:
        probs, target = probs * mask[:, None], target * mask[:, None]
    if soft_label and not squared:  # MONAI's soft-label form (Wang et al. 2023): I = (|p|_1 + |g|_1 - |p - g|_1) / 2
        psum, tsum = probs.abs().sum(-1), target.abs().sum(-1)
        return (psum + tsum - (probs - target).abs().sum(-1)) / 2, psum, tsum, target.sum(-1)
    inter = (probs * target).sum(-1)
    if not squared:
        tsum = target.sum(-1)
        return inter, probs.sum(-1), tsum, tsum
    tsum = (target * target).sum(-1)
    return inter, (probs * probs).sum(-1), tsum, target.sum(-1) if soft_label else tsum


def cross_entropy_sums(
    x: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None, mask: torch.Tensor | None,
    ce: CrossEntropy,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The cross entropy's sum over the counted voxels and its mean's denominator (as ``F.cross_entropy``: the class
    weights of the counted voxels for a label map; the counted voxels for probability targets; BCE: the counted
    (voxel, channel) pairs). A label map is gathered, never one-hot; its softmax CE is written from the log-sum-exp
    (:func:`nll_from_lse`), as ``F.cross_entropy``'s ``nll_loss`` has no deterministic CUDA kernel."""
    x = wide(x)
    w = None if ce.weight is None else ce.weight.to(x)
    num_ch = x.shape[1]
    if ce.sigmoid or num_ch == 1:  # BCE-with-logits pw g softplus(-x) + (1 - g) softplus(x), per channel
        pw = None if w is None else w.reshape(-1, 1) if w.ndim else w
        if labels is not None:
            x_true = x.gather(1, labels[:, None]).squeeze(1)
            pw_true = 1.0 if pw is None else pw.reshape(-1)[labels] if pw.ndim else pw
            per_voxel = F.softplus(x).sum(1) + pw_true * F.softplus(-x_true) - F.softplus(x_true)
        else:
            assert target is not None  # one of the two
            per_voxel = F.binary_cross_entropy_with_logits(x, target, pos_weight=pw, reduction="none").sum(1)
        if mask is None:
            return per_voxel.sum(), as_count(per_voxel.numel() * num_ch, per_voxel)
        return (per_voxel * mask).sum(), (mask.sum() * num_ch).clamp_min(1.0)
    if labels is None:
        assert target is not None  # one of the two
        nll = F.cross_entropy(x, target, weight=w, label_smoothing=ce.label_smoothing, reduction="none")
        if mask is None:  # probability targets: the mean is over voxels, whatever the weights
            return nll.sum(), as_count(nll.numel(), nll)
        return (nll * mask).sum(), mask.sum().clamp_min(1.0)
    lse = torch.logsumexp(x, 1)
    nll = nll_from_lse(lse, x.gather(1, labels[:, None]).squeeze(1))
    if w is not None:
        nll = nll * w[labels]
    if ce.label_smoothing > 0:  # sum over classes of (weighted) -log p_c = lse - x_c
        smooth = nll_from_lse(lse[:, None], x) if w is None else nll_from_lse(lse[:, None], x) * w[:, None]
        nll = (1.0 - ce.label_smoothing) * nll + (ce.label_smoothing / num_ch) * smooth.sum(1)
    return (nll if mask is None else nll * mask).sum(), counted_weight(labels, mask, w, x)


def counted_weight(
    labels: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """The summed class weights of the counted voxels (a mean CE's denominator over a label map, as torch's)."""
    if weight is None and mask is None:
        return as_count(labels.numel(), like)
    acc = torch.promote_types(like.dtype, torch.float32)
    wt = weight.to(device=labels.device, dtype=acc)[labels] if weight is not None else None
    if mask is not None:
        wt = mask.to(acc) if wt is None else wt * mask
    assert wt is not None
    return wt.sum().clamp_min(torch.finfo(acc).tiny)


def focal_class_sums(
    x: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None, mask: torch.Tensor | None,
    focal: Focal,
) -> torch.Tensor:  # fmt: skip
    """The focal term's sums (B, C) over the counted voxels, in MONAI ``FocalLoss``'s sigmoid form (``focal.kind``
    1, :func:`sigmoid_focal`, every element) or softmax form (2, :func:`softmax_focal`, the true class), in ``x``'s
    float32-or-wider dtype. A label map is never one-hot encoded."""
    x, c = wide(x), x.shape[1]
    if labels is not None and focal.kind == 1:
        return sigmoid_focal_label_sums(x, labels, mask, focal).to(x.dtype)
    if labels is not None:
        lp = -nll_from_lse(torch.logsumexp(x, 1), x.gather(1, labels[:, None]).squeeze(1))  # log p_t
        per_voxel = softmax_focal(lp, labels, focal)
        return class_sums(per_voxel if mask is None else per_voxel * mask, labels, c).to(x.dtype)
    assert target is not None  # one of the two
    t = target.to(x.dtype)
    if focal.kind == 2:
        per_element = softmax_focal(torch.log_softmax(x, 1), torch.arange(c, device=x.device)[:, None], focal) * t
    else:
        per_element = sigmoid_focal(x, t, focal)
    return (per_element if mask is None else per_element * mask[:, None]).sum(-1)
