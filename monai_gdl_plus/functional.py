"""Functional core of the Dice-family losses and of the per-class Dice metric.

Tensors in, tensors out, no state. Every loss is the same four steps:

1. :func:`prepare` -- activation, label map or one-hot target, ignore mask, kept channels;
2. :func:`per_class_terms` -- intersection ``I = sum(p * g)``, prediction sum ``P = sum(p)`` (or ``sum(p**2)``)
   and target sum ``G = sum(g)`` per (sample, class), without ever building a dense one-hot of a label map;
3. :func:`dice_from_terms` / :func:`tversky_from_terms` / :func:`generalized_dice_from_terms` -- combine the terms;
4. :func:`reduce_loss` -- ``"none" | "mean" | "sum"``.

:func:`dice_plus_loss` and :func:`generalized_dice_plus_loss` chain those steps (plus an optional cross-entropy
term), configured by one options object each (:mod:`monai_gdl_plus.options`); the ``nn.Module`` classes in
:mod:`monai_gdl_plus.losses` are thin wrappers around them. The metric shares
:func:`per_class_terms` and :func:`label_terms` (hard counts).

Forms (MONAI 1.6.1): with ``D = P + G``,
Dice ``1 - (2I + smooth_nr) / (D + smooth_dr)``, Jaccard ``1 - (2I + smooth_nr) / (2(D - I) + smooth_dr)``,
Tversky ``1 - (I + smooth_nr) / (I + alpha (P - I) + beta (G - I) + smooth_dr)``.
References: Milletari et al. 2016 (V-Net, squared denominator); Sudre et al. 2017 (Generalised Dice); Salehi et al.
2017 (Tversky).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from monai_gdl_plus._fused import (
    Focal,
    _on_host,
    _sigmoid_focal,
    _softmax_focal,
    autocast_off,
    class_sums,
    fused_label_terms,
)
from monai_gdl_plus.options import (
    ABSENT_WEIGHTS,
    REDUCTIONS,
    W_TYPES,
    AbsentWeight,
    DiceOptions,
    GeneralizedDiceOptions,
    WType,
    check_option,
)

__all__ = [
    "REDUCTIONS",
    "DiceOptions",
    "GeneralizedDiceOptions",
    "check_option",
    "check_weight",
    "check_integer_labels",
    "check_label_range",
    "dense_ignore_mask",
    "plain_tensor",
    "W_TYPES",
    "ABSENT_WEIGHTS",
    "DiceTerms",
    "Prepared",
    "activate",
    "prepare",
    "per_class_terms",
    "label_terms",
    "dice_from_terms",
    "tversky_from_terms",
    "generalized_dice_from_terms",
    "gdl_weights",
    "reduce_loss",
    "cross_entropy_term",
    "focal_sums",
    "focal_from_sums",
    "dice_plus_loss",
    "generalized_dice_plus_loss",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# label maps with a softmax/sigmoid take the fused path; the tests turn it off to compare with the plain path
_FUSED_LABEL_PATH = True


class DiceTerms(NamedTuple):
    """Per-class sums shared by the losses and the metric, each of shape (B, C) (or (C,) once summed over batch).

    Attributes:
        intersection: ``sum(p * g)``.
        pred_sum: ``sum(p)``, or ``sum(p**2)`` for the squared (V-Net) denominator.
        target_sum: ``sum(g)``, or ``sum(g**2)`` for the squared denominator (the same for a binary target).
    """

    intersection: torch.Tensor
    pred_sum: torch.Tensor
    target_sum: torch.Tensor


class Prepared(NamedTuple):
    """What :func:`prepare` returns.

    Attributes:
        probs: activated prediction (B, C, N), all C channels, float32 or float64 (:func:`prepare`); inside the
            losses, before the activation, the raw ``input`` viewed as (B, C, N) in its own dtype.
        labels: integer label map (B, N) with ignored voxels set to 0, or None for a dense target.
        target: dense target (B, C, N), or None for a label map.
        mask: (B, N) float, 1 = voxel counts, 0 = ignored; None without ``ignore_index``.
        keep: the channel indices that enter the Dice sums (background and an in-range ignore_index dropped).
    """

    probs: torch.Tensor
    labels: torch.Tensor | None
    target: torch.Tensor | None
    mask: torch.Tensor | None
    keep: tuple[int, ...]


# --------------------------------------------------------------------------------------------------------------------
# static class weights (the other options: monai_gdl_plus.options)
# --------------------------------------------------------------------------------------------------------------------


def check_weight(
    weight: Sequence[float] | float | int | torch.Tensor | None, copy: bool = True
) -> torch.Tensor | None:
    """Static class weights as a float tensor (0-d or 1-d), checked for sign and finiteness (on the host: no sync);
    a tensor is copied unless ``copy=False``."""
    if weight is None:
        return None
    try:
        w = torch.as_tensor(weight).detach()
        w = w.clone() if copy else w
        w = w if w.is_floating_point() else w.to(torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"`weight` must be a number, a sequence of numbers or a tensor, got {weight!r}.") from e
    if w.ndim > 1:
        raise ValueError(
            f"`weight` must be a scalar or a 1-D sequence (one value per class), got shape {tuple(w.shape)}."
        )
    if _on_host(w.device) and _checks_enabled(w) and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError(f"`weight` values must be finite and no less than 0, got {w.tolist()}.")
    return w


# --------------------------------------------------------------------------------------------------------------------
# step 1: preparation
# --------------------------------------------------------------------------------------------------------------------


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """Drop tensor subclasses such as MONAI's MetaTensor (autograd-transparent; plain ops are faster)."""
    if type(x) is not torch.Tensor and isinstance(x, torch.Tensor):
        return x.as_subclass(torch.Tensor)
    return x


def _checks_enabled(x: torch.Tensor) -> bool:
    """Value checks that read data: never while torch.compile traces, never on the meta device."""
    if x.device.type == "meta":
        return False
    return not torch.compiler.is_compiling()


# devices with an asynchronous device-side assertion (the CPU one is reached in the tests' accelerator mode)
_ASYNC_ASSERT_DEVICES = ("cuda", "cpu")


def _value_check(ok: torch.Tensor, message: str, validate: bool) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (a 0-d bool tensor) holds, without a host sync off the CPU.

    CPU tensors are checked eagerly (no sync to speak of). On an accelerator the check is an asynchronous device
    assertion (a RuntimeError with ``message`` at the next sync) unless ``validate=True``, which makes it a full
    (synchronising) check with the readable ValueError.
    """
    if not _checks_enabled(ok):
        return
    if _on_host(ok.device) or validate:
        if not bool(ok):
            raise ValueError(message)
    elif ok.device.type in _ASYNC_ASSERT_DEVICES:
        torch._assert_async(ok, message)


def activate(
    input: torch.Tensor, sigmoid: bool = False, softmax: bool = False, other_act: Callable | None = None
) -> torch.Tensor:
    """Apply the activation along the channel axis (dim 1); fp16/bf16 inputs are computed in float32.

    With one channel, ``softmax=True`` is ignored with a warning (as MONAI does).
    """
    x = input.float() if input.dtype in _LOW_PRECISION else input
    if sigmoid:
        return torch.sigmoid(x)
    if softmax:
        if input.shape[1] == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
            return x
        return torch.softmax(x, 1)
    if other_act is not None:
        out = other_act(x)
        return out.float() if out.dtype in _LOW_PRECISION else out
    return x


def _check_shapes(input: torch.Tensor, target: torch.Tensor) -> None:
    if input.ndim < 3:
        raise ValueError(
            f"`input` must have shape (B, C, *spatial) with at least one spatial axis, got {tuple(input.shape)}."
        )
    if target.ndim != input.ndim:
        raise ValueError(
            f"`target` must have as many dimensions as `input` (B, C or 1, *spatial): got target shape "
            f"{tuple(target.shape)} and input shape {tuple(input.shape)}."
        )
    if target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
        raise ValueError(
            f"`target` batch and spatial shape must match `input`: got target shape {tuple(target.shape)} "
            f"and input shape {tuple(input.shape)}."
        )


def check_integer_labels(labels: torch.Tensor, name: str = "target", validate: bool = False) -> None:
    """A floating label map must hold whole numbers: ValueError naming ``name`` (see :func:`_value_check`)."""
    if (labels.is_floating_point() or labels.is_complex()) and _checks_enabled(labels):
        _value_check(
            (labels == torch.round(labels)).all(),
            f"`{name}` label map must hold integer class indices, got non-integer values.",
            validate,
        )


def check_label_range(
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    name: str = "target",
    validate: bool = False,
    valid: torch.Tensor | None = None,
) -> None:
    """Every label in [0, num_classes) or equal to ``ignore_index``, without a host sync on an accelerator.

    CPU tensors (or ``validate=True``): a ValueError naming ``name`` and listing the offending values. CUDA: an
    asynchronous device assertion. While ``torch.compile`` traces: a traced ``torch._assert_async`` (a RuntimeError
    with the same message; an out-of-range label would otherwise be an out-of-bounds read in a generated kernel).
    Skipped on the meta device. ``valid``: ``labels != ignore_index``, where the caller needs it anyway (computed
    here otherwise).
    """
    if labels.device.type == "meta" or labels.numel() == 0:
        return
    if valid is None and ignore_index is not None:
        valid = labels != ignore_index
    # one min/max pass over the labels, ignored voxels counted as class 0
    lo, hi = torch.aminmax(labels if valid is None else torch.where(valid, labels, 0))
    ok = (lo >= 0) & (hi < num_classes)
    msg = f"`{name}` label values must lie in [0, {num_classes})" + (
        "" if ignore_index is None else f" or equal `ignore_index`={ignore_index}"
    )
    if torch.compiler.is_compiling():
        torch._assert_async(ok, msg + ".")
    elif _on_host(labels.device) or validate:
        if not bool(ok):
            bad = (labels < 0) | (labels >= num_classes)
            bad = bad if valid is None else bad & valid
            raise ValueError(f"{msg}, got {torch.unique(labels[bad])[:8].tolist()}.")
    else:
        _value_check(ok, msg + ".", validate)


def _label_map(
    target: torch.Tensor, num_classes: int, ignore_index: int | None, validate: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer labels (B, N) with ignored voxels mapped to 0, and the keep-mask (B, N) or None."""
    t = target.reshape(target.shape[0], -1)
    check_integer_labels(t, "target", validate)
    t = t.long()
    valid = None if ignore_index is None else t != ignore_index
    check_label_range(t, num_classes, ignore_index, name="target", validate=validate, valid=valid)
    if valid is not None:
        t = torch.where(valid, t, torch.zeros_like(t))
    if torch.compiler.is_compiling():
        # the traced range check may raise only after the kernels indexing with these labels ran: keep their reads in
        # bounds (fused into the index computation; an out-of-bounds read in a generated CPU kernel aborts)
        t = t.clamp(0, num_classes - 1)
    return t, None if valid is None else valid.to(torch.float32)


def dense_ignore_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor | None:
    """MONAI's ignore mask for a dense target (B, C, N): label compare for one channel; one-hot rules otherwise."""
    if ignore_index is None:
        return None
    if target.shape[1] == 1:
        return (target[:, 0] != ignore_index).to(torch.float32)
    if 0 <= ignore_index < target.shape[1]:
        return (1.0 - target[:, ignore_index]).to(torch.float32)
    return (target.sum(1) > 0).to(torch.float32)


def prepare(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    soft_label: bool = False,
    ignore_index: int | None = None,
    validate: bool = False,
) -> Prepared:
    """Activation, target layout, ignore mask and kept channels, shared by every loss.

    Args:
        input: logits or probabilities ``(B, C, *spatial)``.
        target: one-hot / binary ``(B, C, *spatial)``, or a label map ``(B, 1, *spatial)`` with ``to_onehot_y=True``.
        include_background: keep channel 0 in the sums.
        to_onehot_y: treat a one-channel target as a label map of ``C`` classes (never materialised as one-hot).
        sigmoid, softmax, other_act: activation (at most one).
        soft_label: allow non-binary dense targets.
        ignore_index: label whose voxels are excluded from every sum; an index in [0, C) also drops its channel.
        validate: run every value check, synchronising if needed, and scan ``input`` for NaN/Inf.

    Raises:
        ValueError: shapes that do not match, label values outside [0, C) other than ``ignore_index``,
            a non-binary target without ``soft_label``, NaN/Inf in ``input`` with ``validate=True``.
    """
    input = plain_tensor(input)
    prep = _prepare_target(
        input, target, include_background=include_background, to_onehot_y=to_onehot_y, soft_label=soft_label,
        ignore_index=ignore_index, validate=validate,
    )  # fmt: skip
    with autocast_off(input.device):
        probs = activate(input, sigmoid, softmax, other_act).reshape(prep.probs.shape)
    return prep._replace(probs=probs)


def _prepare_target(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool,
    to_onehot_y: bool,
    soft_label: bool,
    ignore_index: int | None,
    validate: bool,
) -> Prepared:
    """:func:`prepare` without the activation: ``probs`` holds the (B, C, N) view of the raw ``input``."""
    input, target = plain_tensor(input), plain_tensor(target)
    _check_shapes(input, target)
    if validate and _checks_enabled(input):
        if not bool(torch.isfinite(input).all()):
            raise ValueError("`input` contains NaN or Inf values (found by `validate=True`).")
    num_ch = input.shape[1]
    b = input.shape[0]
    dtype = torch.promote_types(input.dtype, torch.float32)

    if to_onehot_y and num_ch == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4)
    label_path = to_onehot_y and num_ch > 1
    if label_path and target.shape[1] != 1:
        raise ValueError(
            f"`to_onehot_y=True` expects a label map `target` of shape (B, 1, *spatial), got target shape "
            f"{tuple(target.shape)} for input shape {tuple(input.shape)}."
        )
    if not label_path and target.shape[1] != num_ch:
        hint = " A label map needs `to_onehot_y=True`." if target.shape[1] == 1 else ""
        raise ValueError(
            f"`target` must have {num_ch} channels like `input` (one-hot), got target shape {tuple(target.shape)} "
            f"and input shape {tuple(input.shape)}.{hint}"
        )

    labels = dense = mask = None
    if label_path:
        labels, mask = _label_map(target, num_ch, ignore_index, validate)
    else:
        dense = target.reshape(b, num_ch, -1)
        if not dense.is_floating_point() or dense.dtype in _LOW_PRECISION:
            dense = dense.to(dtype)
        mask = dense_ignore_mask(dense, ignore_index)
        if not soft_label and _checks_enabled(dense):
            counted = dense if mask is None else dense * mask[:, None]
            _value_check(
                ((counted == 0) | (counted == 1)).all(),
                "`target` must be binary (0/1) unless `soft_label=True`; got non-binary values.",
                validate,
            )

    if not include_background and num_ch == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=4)
    start = 1 if (not include_background and num_ch > 1) else 0
    if mask is not None:
        mask = mask.to(dtype)
    keep = tuple(c for c in range(start, num_ch) if not (ignore_index is not None and c == ignore_index and num_ch > 1))
    if not keep:
        raise ValueError(
            f"no class left to score: `input` has {num_ch} channels, include_background={include_background} and "
            f"`ignore_index`={ignore_index} drop them all."
        )
    return Prepared(input.reshape(b, num_ch, -1), labels, dense, mask, keep)


# --------------------------------------------------------------------------------------------------------------------
# step 2: per-class terms
# --------------------------------------------------------------------------------------------------------------------


def _label_terms_soft(
    probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, squared: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_ch = probs.shape[1]
    true_p = probs.gather(1, labels[:, None]).squeeze(1)  # (B, N): probability of the true class
    if mask is not None:
        true_p = true_p * mask
    inter = class_sums(true_p, labels, num_ch).to(probs.dtype)
    tsum = class_sums(mask, labels, num_ch).to(probs.dtype)  # mask None: voxel counts
    q = probs * probs if squared else probs
    # element-wise, not einsum: a matmul's backward would run in float16 where backward is called under autocast
    psum = q.sum(-1) if mask is None else (q * mask[:, None]).sum(-1)
    return inter, psum, tsum


def _dense_terms(
    probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, squared: bool, soft_label: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(I, P, G, V) for a dense target; V = sum(g) (GDL volumes), which differs from G only for squared soft labels."""
    if mask is not None:
        probs = probs * mask[:, None]
        target = target * mask[:, None]
    if soft_label and not squared:
        # MONAI's soft-label form (Wang et al. 2023): I = (|p|_1 + |g|_1 - |p - g|_1) / 2
        psum = probs.abs().sum(-1)
        tsum = target.abs().sum(-1)
        inter = (psum + tsum - (probs - target).abs().sum(-1)) / 2
        vol = target.sum(-1)
        return inter, psum, tsum, vol
    inter = (probs * target).sum(-1)
    if squared:
        psum = (probs * probs).sum(-1)
        tsum = (target * target).sum(-1)
        vol = target.sum(-1) if soft_label else tsum
    else:
        psum = probs.sum(-1)
        tsum = vol = target.sum(-1)
    return inter, psum, tsum, vol


def _dense(prep: Prepared) -> torch.Tensor:
    """The dense target of a :class:`Prepared` (callers have checked that it is not a label map)."""
    if prep.target is None:
        raise ValueError("expected a dense (one-hot) target, got a label map.")
    return prep.target


def _terms_and_volumes(prep: Prepared, squared: bool, soft_label: bool) -> tuple[DiceTerms, torch.Tensor]:
    """Kept-channel terms and true volumes from an activated :class:`Prepared` (plain autograd path)."""
    if prep.labels is not None:
        inter, psum, tsum = _label_terms_soft(prep.probs, prep.labels, prep.mask, squared)
        vol = tsum
    else:
        inter, psum, tsum, vol = _dense_terms(prep.probs, _dense(prep), prep.mask, squared, soft_label)
    return _select(DiceTerms(inter, psum, tsum), vol, prep.keep)


def per_class_terms(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    squared: bool = False,
    mask: torch.Tensor | None = None,
    soft_label: bool = False,
) -> DiceTerms:
    """Per-(sample, class) intersection, prediction sum and target sum.

    Args:
        probs: activated prediction ``(B, C, *spatial)``, values usually in [0, 1].
        target: dense target ``(B, C, *spatial)``, or an integer label map ``(B, 1, *spatial)`` / ``(B, *spatial)``
            with values in [0, C) -- a label map is never expanded to a one-hot tensor.
        squared: use ``sum(p**2)`` and ``sum(g**2)`` (V-Net) for the sums.
        mask: optional ``(B, 1, *spatial)`` or ``(B, *spatial)`` weights, 1 = counted, 0 = ignored.
        soft_label: MONAI's soft-label intersection for dense non-binary targets.

    Returns:
        :class:`DiceTerms` of (B, C) tensors in ``probs``' dtype (float32 for half inputs).

    Shapes:
        probs ``(B, C, *S)``; target ``(B, C, *S)`` | ``(B, 1, *S)`` | ``(B, *S)``; output (B, C) each.

    Examples:
        A label map and its one-hot give the same terms:

        >>> import torch
        >>> from monai_gdl_plus.functional import dice_from_terms, per_class_terms
        >>> p = torch.tensor([[[0.7, 0.0], [0.3, 1.0]]])  # (B=1, C=2, N=2) probabilities
        >>> terms = per_class_terms(p, torch.tensor([[[0, 0]]]))  # label map (B, 1, N): class 0 twice
        >>> terms
        DiceTerms(intersection=tensor([[0.7000, 0.0000]]), pred_sum=tensor([[0.7000, 1.3000]]),
                  target_sum=tensor([[2., 0.]]))
        >>> dense = per_class_terms(p, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]))  # its one-hot (B, C, N)
        >>> all(torch.equal(a, b) for a, b in zip(terms, dense))
        True
        >>> dice_from_terms(terms)  # 1 - 1.4 / 2.7, and class 1 (absent, 1.3 predicted) near 1
        tensor([[0.4815, 1.0000]])
    """
    probs, target = plain_tensor(probs), plain_tensor(target)
    with autocast_off(probs.device):
        return _per_class_terms(probs, target, squared, mask, soft_label)


def _per_class_terms(
    probs: torch.Tensor, target: torch.Tensor, squared: bool, mask: torch.Tensor | None, soft_label: bool
) -> DiceTerms:
    b, num_ch = probs.shape[:2]
    p = probs.float() if probs.dtype in _LOW_PRECISION else probs
    p = p.reshape(b, num_ch, -1)
    m = None if mask is None else plain_tensor(mask).reshape(b, -1).to(p.dtype)
    one_channel_labels = num_ch == 1 and not target.is_floating_point()
    dense = target.ndim == probs.ndim and target.shape[1] == num_ch and not one_channel_labels
    if dense:
        t = target.reshape(b, num_ch, -1)
        t = t.to(p.dtype) if (not t.is_floating_point() or t.dtype != p.dtype) else t
        inter, psum, tsum, _ = _dense_terms(p, t, m, squared, soft_label)
        return DiceTerms(inter, psum, tsum)
    labels = target.reshape(b, -1).long()
    inter, psum, tsum = _label_terms_soft(p, labels, m, squared)
    return DiceTerms(inter, psum, tsum)


def label_terms(
    pred_labels: torch.Tensor,
    target_labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    names: tuple[str, str] = ("pred_labels", "target_labels"),
) -> DiceTerms:
    """Hard per-class counts from two integer label maps, without one-hot tensors (the metric's core).

    Args:
        pred_labels: predicted class per voxel ``(B, *spatial)``, values in [0, num_classes).
        target_labels: true class per voxel, same shape; values in [0, num_classes) or ``ignore_index``.
        num_classes: number of classes C.
        ignore_index: voxels whose target equals it are left out of all three counts.
        names: the two arguments' names in range errors (a caller's own names, e.g. ``("y_pred", "y")``).

    Returns:
        :class:`DiceTerms` of int64 (B, C) counts: true positives, predicted voxels, true voxels per class.

    Examples:
        >>> import torch
        >>> from monai_gdl_plus.functional import label_terms
        >>> pred = torch.tensor([[0, 1, 1, 2]])  # (B=1, N=4)
        >>> true = torch.tensor([[0, 1, 255, 2]])  # the third voxel is unlabelled
        >>> label_terms(pred, true, num_classes=3, ignore_index=255)
        DiceTerms(intersection=tensor([[1, 1, 1]]), pred_sum=tensor([[1, 1, 1]]), target_sum=tensor([[1, 1, 1]]))
    """
    pred_labels, target_labels = plain_tensor(pred_labels), plain_tensor(target_labels)
    if pred_labels.shape != target_labels.shape:
        raise ValueError(
            f"`pred_labels` and `target_labels` must have the same shape, got {tuple(pred_labels.shape)} "
            f"and {tuple(target_labels.shape)}."
        )
    b = pred_labels.shape[0]
    p = pred_labels.reshape(b, -1).long()
    t = target_labels.reshape(b, -1).long()
    valid = None if ignore_index is None else t != ignore_index
    check_label_range(t, num_classes, ignore_index, name=names[1], valid=valid)
    check_label_range(p, num_classes, name=names[0])  # an out-of-range prediction would land in a wrong bin
    # one confusion count per sample: bin (b, t, p); ignored voxels go to one extra bin at the end
    c = num_classes
    bins = b * c * c
    # (b * C + t) * C + p, written with add(alpha=): int64 multiplies are not vectorised on x86 CPUs (8x slower)
    idx = torch.add(p, t, alpha=c)
    idx += torch.arange(0, bins, c * c, device=t.device)[:, None]
    if valid is not None:
        idx = torch.where(valid, idx, bins)
    idx = idx.reshape(-1)
    if _on_host(idx.device) and not torch.compiler.is_compiling():
        counts = torch.bincount(idx, minlength=bins + 1)
    else:  # bincount sizes its output from the data (a host sync on GPUs); a fixed-size scatter does not
        counts = torch.zeros(bins + 1, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    conf = counts[:bins].view(b, c, c)  # [sample, true class, predicted class]
    return DiceTerms(conf.diagonal(dim1=1, dim2=2), conf.sum(1), conf.sum(2))


# --------------------------------------------------------------------------------------------------------------------
# step 3: combine
# --------------------------------------------------------------------------------------------------------------------


def _ratio(inter: torch.Tensor, denom_sum: torch.Tensor, smooth_nr: float, smooth_dr: float, jaccard: bool):
    den = 2.0 * (denom_sum - inter) if jaccard else denom_sum
    return 1.0 - (2.0 * inter + smooth_nr) / (den + smooth_dr)


def dice_from_terms(
    terms: DiceTerms, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, jaccard: bool = False
) -> torch.Tensor:
    """Per-class Dice (or Jaccard) loss ``1 - (2I + smooth_nr) / (P + G + smooth_dr)``, same shape as the terms."""
    return _ratio(terms.intersection, terms.pred_sum + terms.target_sum, smooth_nr, smooth_dr, jaccard)


def _tversky_ratio(inter, fp, fn, alpha: float, beta: float, smooth_nr: float, smooth_dr: float) -> torch.Tensor:
    return 1.0 - (inter + smooth_nr) / (inter + alpha * fp + beta * fn + smooth_dr)


def tversky_from_terms(
    terms: DiceTerms, alpha: float = 0.5, beta: float = 0.5, *, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5
) -> torch.Tensor:
    """Per-class Tversky loss (Salehi et al. 2017) ``1 - (I + smooth_nr) / (I + alpha FP + beta FN + smooth_dr)``
    with ``FP = P - I`` and ``FN = G - I`` (linear sums; MONAI's ``TverskyLoss``). ``alpha = beta = 0.5`` is Dice."""
    i = terms.intersection
    return _tversky_ratio(i, terms.pred_sum - i, terms.target_sum - i, alpha, beta, smooth_nr, smooth_dr)


def gdl_weights(
    volumes: torch.Tensor,
    w_type: WType = "square",
    absent_weight: AbsentWeight = "max",
    static_weight: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Generalised Dice class weights per sample (last axis = classes), no gradient.

    Order: volume weights (``1/V**2``, ``1/V`` or 1), then the absent-class policy (classes with ``V == 0`` get
    the largest present weight, zero, or a given raw weight), then -- if no class of the sample is present at
    all -- uniform weights 1 (kept finite; such a sample is scored by :func:`generalized_dice_from_terms`' empty
    rule), then x ``static_weight``, then division by the sum over classes when ``normalize``.
    """
    v = volumes.detach().to(torch.float64)
    present = v > 0
    safe_v = torch.where(present, v, torch.ones_like(v))
    if w_type == "square":
        w = 1.0 / (safe_v * safe_v)
    elif w_type == "simple":
        w = 1.0 / safe_v
    else:
        w = torch.ones_like(v)
    if absent_weight == "max":
        fill = torch.where(present, w, torch.zeros_like(w)).amax(-1, keepdim=True)
    elif absent_weight == "zero":
        fill = torch.zeros_like(w[..., :1])
    else:
        fill = torch.full_like(w[..., :1], float(absent_weight))
    w = torch.where(present, w, fill)
    w = torch.where(present.any(-1, keepdim=True), w, torch.ones_like(w))
    if static_weight is not None:
        w = w * static_weight.to(w)
    if normalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w


def generalized_dice_from_terms(
    terms: DiceTerms,
    volumes: torch.Tensor,
    *,
    w_type: WType = "square",
    absent_weight: AbsentWeight = "max",
    static_weight: torch.Tensor | None = None,
    normalize_weights: bool = True,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    jaccard: bool = False,
    tversky: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Generalised Dice loss ``1 - (2 sum_c w_c I_c + smooth_nr) / (sum_c w_c (P_c + G_c) + smooth_dr)``.

    With ``tversky=(alpha, beta)`` the generalised Tversky loss: the same weights on ``I``, ``FP = P - I`` and
    ``FN = G - I``, ``1 - (sum_c w_c I_c + smooth_nr) / (sum_c w_c (I_c + alpha FP_c + beta FN_c) + smooth_dr)``.

    Empty rule: a sample in which no class is present (every ``V_c = 0``) has ``I = G = 0``, where any Dice form
    saturates near 1 with a vanishing gradient (MONAI: 0 with zero gradient). It is scored instead as the soft
    count of false-positive voxels ``S = sum_c P_c`` against one voxel: ``S / (S + 1)`` -- 0 for an empty
    prediction, 0.5 for one confidently wrong voxel, towards 1 for more, with gradient ``1 / (S + 1)**2``.

    Args:
        terms: per-class terms with classes on the last axis, (B, C) or (C,).
        volumes: true volumes ``sum(g)`` of the same shape (the weights' input).

    Returns:
        (B,) or a 0-d tensor.
    """
    w = gdl_weights(volumes, w_type, absent_weight, static_weight, normalize_weights).to(terms.intersection.dtype)
    inter = (w * terms.intersection).sum(-1)
    if tversky is not None:
        fp = (w * (terms.pred_sum - terms.intersection)).sum(-1)
        fn = (w * (terms.target_sum - terms.intersection)).sum(-1)
        f = _tversky_ratio(inter, fp, fn, *tversky, smooth_nr, smooth_dr)
    else:
        f = _ratio(inter, (w * (terms.pred_sum + terms.target_sum)).sum(-1), smooth_nr, smooth_dr, jaccard)
    empty = ~(volumes > 0).any(-1)
    fp = terms.pred_sum.sum(-1).clamp_min(0.0)
    return torch.where(empty, fp / (fp + 1.0), f)


# --------------------------------------------------------------------------------------------------------------------
# step 4: reduction, cross entropy, static weights
# --------------------------------------------------------------------------------------------------------------------


def reduce_loss(f: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` / ``"sum"`` over every element, ``"none"`` returns ``f`` unchanged."""
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    return f


def _split_weight(
    weight: torch.Tensor | None, num_classes: int, include_background: bool, keep: tuple[int, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Static weights for the Dice sums (one per kept channel) and for the CE term (one per class).

    Lengths follow MONAI: C (DiceCELoss: CE uses all, Dice drops the first without background) or, without
    background, C - 1 (DiceLoss: one per non-background class; CE then gives the background weight 1). A scalar
    applies to every class. Lengths count classes before an in-range ``ignore_index`` channel is dropped.
    """
    if weight is None:
        return None, None
    if weight.ndim == 0:
        full = weight.expand(num_classes)
    elif weight.shape[0] == num_classes:
        full = weight
    elif not include_background and num_classes > 1 and weight.shape[0] == num_classes - 1:
        full = torch.cat([torch.ones_like(weight[:1]), weight])
    else:
        expected = f"{num_classes}" + ("" if include_background else f" or {num_classes - 1}")
        raise ValueError(
            f"`weight` must have one value per class ({expected} for {num_classes} input channels with "
            f"include_background={include_background}), got length {weight.shape[0]}."
        )
    return _take_channels(full, keep, 0), full


def cross_entropy_term(
    input: torch.Tensor,
    prep: Prepared,
    *,
    sigmoid: bool,
    ignore_index: int | None,
    class_weight: torch.Tensor | None,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    """Cross entropy (softmax) or per-channel BCE-with-logits (sigmoid, or one channel) on the logits ``input``.

    Ignored voxels are left out; ``class_weight`` is CE's ``weight`` or BCE's ``pos_weight``.
    """
    return _cross_entropy_parts(input, prep, sigmoid, class_weight, label_smoothing).value(reduction)


class _Mean(NamedTuple):
    """A per-voxel term as a sum and its mean's denominator (both sums, so that processes can add them up)."""

    num: torch.Tensor
    den: torch.Tensor

    def value(self, reduction: str) -> torch.Tensor:
        return self.num if reduction == "sum" else self.num / self.den


def _cross_entropy_parts(
    input: torch.Tensor, prep: Prepared, sigmoid: bool, class_weight: torch.Tensor | None, label_smoothing: float
) -> _Mean:
    x = plain_tensor(input)
    x = x.float() if x.dtype in _LOW_PRECISION else x
    b, num_ch = x.shape[:2]
    x = x.reshape(b, num_ch, -1)
    w = None if class_weight is None else class_weight.to(x)
    if sigmoid or num_ch == 1:
        return _bce_parts(x, prep, w)
    if prep.labels is not None:
        return _Mean(_label_map_ce(x, prep.labels, prep.mask, w, label_smoothing).sum(), _ce_count(prep, w))
    target = _dense(prep)
    ce = F.cross_entropy(x, target, weight=w, label_smoothing=label_smoothing, reduction="none")
    if prep.mask is None:  # probability targets: the mean is over voxels, whatever the weights
        return _Mean(ce.sum(), _as_count(ce.numel(), ce))
    return _Mean((ce * prep.mask).sum(), prep.mask.sum().clamp_min(1.0))


def _as_count(n: int, like: torch.Tensor) -> torch.Tensor:
    """``n`` as a 0-d tensor on ``like``'s device, by a fill (no host-to-device copy per step)."""
    return torch.full((), float(n), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


def _label_map_ce(
    x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, w: torch.Tensor | None, label_smoothing: float
) -> torch.Tensor:
    """Per-voxel softmax cross entropy (B, N) of logits (B, C, N) against labels (B, N), as
    ``F.cross_entropy(..., reduction="none")`` with ``weight`` and ``label_smoothing``, masked.

    Written as a log-softmax gather rather than ``F.cross_entropy``: its ``nll_loss`` has no deterministic CUDA
    kernel, so ``torch.use_deterministic_algorithms(True)`` would make it raise there.
    """
    logp = torch.log_softmax(x, 1)
    nll = logp.gather(1, labels[:, None]).squeeze(1).neg()
    if w is not None:
        nll = nll * w[labels]
    if label_smoothing > 0:
        smooth = (logp if w is None else logp * w[:, None]).sum(1).neg()
        nll = (1.0 - label_smoothing) * nll + (label_smoothing / x.shape[1]) * smooth
    return nll if mask is None else nll * mask


def _ce_count(prep: Prepared, weight: torch.Tensor | None) -> torch.Tensor:
    """Denominator of a mean CE over a label map: the summed class weights of the counted voxels (as torch)."""
    if prep.labels is None:
        raise ValueError("_ce_count needs a label-map target.")
    if weight is None and prep.mask is None:
        return _as_count(prep.labels.numel(), prep.probs)
    acc = torch.promote_types(prep.probs.dtype, torch.float32)
    if weight is None:
        assert prep.mask is not None  # neither weight nor mask returned above
        wt = prep.mask.to(acc)
    else:
        wt = weight.to(acc)[prep.labels]
    if weight is not None and prep.mask is not None:
        wt = wt * prep.mask
    return wt.sum().clamp_min(torch.finfo(acc).tiny)


def _bce_parts(x: torch.Tensor, prep: Prepared, pos_weight: torch.Tensor | None) -> _Mean:
    """Per-channel BCE-with-logits ``pw*g*softplus(-x) + (1-g)*softplus(x)``; a label map is gathered, not one-hot."""
    pw = None if pos_weight is None else pos_weight.reshape(-1, 1) if pos_weight.ndim else pos_weight
    if prep.labels is not None:
        labels = prep.labels[:, None]
        x_true = x.gather(1, labels).squeeze(1)
        pw_true = 1.0 if pw is None else pw.reshape(-1)[prep.labels] if pw.ndim else pw
        per_voxel = F.softplus(x).sum(1) + pw_true * F.softplus(-x_true) - F.softplus(x_true)
    else:
        loss = F.binary_cross_entropy_with_logits(x, _dense(prep), pos_weight=pw, reduction="none")
        per_voxel = loss.sum(1)
    num_ch = x.shape[1]
    if prep.mask is not None:
        return _Mean((per_voxel * prep.mask).sum(), (prep.mask.sum() * num_ch).clamp_min(1.0))
    return _Mean(per_voxel.sum(), _as_count(per_voxel.numel() * num_ch, per_voxel))


def focal_sums(
    input: torch.Tensor, prep: Prepared, *, gamma: float = 2.0, alpha: float | None = None, softmax: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal loss (Lin et al. 2017) of logits ``input`` summed per (sample, class) over the counted voxels, and the
    number of counted voxels per sample, in MONAI ``FocalLoss``'s forms.

    Sigmoid form (default; MONAI's ``DiceFocalLoss`` uses it whatever the Dice activation): per element
    ``(1 - p_t)**gamma * BCE(x, t)`` with ``p = sigmoid(x)``, times ``alpha t + (1 - alpha)(1 - t)``. Softmax form:
    ``-(1 - p_y)**gamma log p_y`` on the true class only, times ``1 - alpha`` (background) or ``alpha``. A label map
    is never one-hot encoded: the sums over the negatives of every channel get a per-voxel correction at the true
    class, added by a class histogram.

    Returns:
        (B, C) sums and (B,) counts, float32 or wider.
    """
    x = plain_tensor(input)
    x = x.float() if x.dtype in _LOW_PRECISION else x
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    m = prep.mask
    count = _voxel_counts(x, m)
    focal = Focal(2 if softmax else 1, gamma, alpha)
    if softmax:
        logp = torch.log_softmax(x, 1)
        if prep.labels is not None:
            lp = logp.gather(1, prep.labels[:, None]).squeeze(1)
            per_voxel = _softmax_focal(lp, prep.labels, focal)
            per_voxel = per_voxel if m is None else per_voxel * m
            return class_sums(per_voxel, prep.labels, c).to(x.dtype), count
        per_element = -((1.0 - logp.exp()) ** gamma) * logp * _dense(prep)
        if alpha is not None:
            per_element = per_element * torch.tensor([1.0 - alpha] + [alpha] * (c - 1), dtype=x.dtype).to(x)[:, None]
    elif prep.labels is not None:
        negatives = _sigmoid_focal(x, False, focal)
        negatives = negatives.sum(-1) if m is None else (negatives * m[:, None]).sum(-1)
        xt = x.gather(1, prep.labels[:, None]).squeeze(1)
        fix = _sigmoid_focal(xt, True, focal) - _sigmoid_focal(xt, False, focal)
        fix = fix if m is None else fix * m
        return negatives + class_sums(fix, prep.labels, c).to(x.dtype), count
    else:
        t = _dense(prep).to(x.dtype)
        bce = F.softplus(x) - x * t
        per_element = torch.exp(gamma * F.logsigmoid(-x * (2.0 * t - 1.0))) * bce
        if alpha is not None:
            per_element = per_element * (t * alpha + (1.0 - t) * (1.0 - alpha))
    return (per_element if m is None else per_element * m[:, None]).sum(-1), count


def _voxel_counts(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Counted voxels per sample (B,), float32 or wider."""
    acc = torch.promote_types(x.dtype, torch.float32)
    if mask is None:
        return torch.full((x.shape[0],), x[0, 0].numel(), dtype=acc, device=x.device)
    return mask.sum(-1).to(acc)


def focal_from_sums(
    sums: torch.Tensor, count: torch.Tensor, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """The focal term from :func:`focal_sums` of the kept classes, as MONAI's ``FocalLoss`` reduces it: ``"mean"``
    over every (sample, class, counted voxel); ``"sum"`` of the per-(sample, class) means over voxels. ``weight``
    multiplies each class."""
    return _focal_parts(sums, count, weight, reduction).value(reduction)


def _focal_parts(sums: torch.Tensor, count: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> _Mean:
    if weight is not None:
        sums = sums * weight.to(sums)
    if reduction == "sum":  # per-sample means: their sum is what processes add up
        return _Mean((sums / count[:, None].clamp_min(1.0)).sum(), count.sum())
    return _Mean(sums.sum(), (count.sum() * sums.shape[1]).clamp_min(1.0))


# --------------------------------------------------------------------------------------------------------------------
# the two losses as functions
# --------------------------------------------------------------------------------------------------------------------


def _loss_parts(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    o: DiceOptions,
    focal_weight: torch.Tensor | None = None,
) -> tuple[DiceTerms, torch.Tensor, torch.Tensor | None, list[tuple[float, _Mean]]]:
    """Kept-channel terms, true volumes, static Dice weights and the per-voxel terms as ``(lambda, sum and
    denominator)`` pairs (CE, focal; none without them). The focal term's class weights are ``weight``'s unless
    ``focal_weight`` is given.

    A label map with a softmax or sigmoid takes the fused one-hot-free path (:mod:`monai_gdl_plus._fused`, analytic
    in-place backward; a custom op under ``torch.compile``); everything else the plain autograd path.
    """
    x = plain_tensor(input)
    prep = _prepare_target(
        x, target, include_background=o.include_background, to_onehot_y=o.to_onehot_y,
        soft_label=o.soft_label, ignore_index=o.ignore_index, validate=o.validate,
    )  # fmt: skip
    num_ch = x.shape[1]
    dice_w, ce_w = _split_weight(weight, num_ch, o.include_background, prep.keep)
    if focal_weight is None:
        focal_w = dice_w
    else:
        focal_w = _split_weight(focal_weight, num_ch, o.include_background, prep.keep)[0]
    if num_ch - (0 if o.include_background or num_ch == 1 else 1) == 1:
        dice_w = None  # as MONAI: no class weight on the Dice term when a single class is scored
    softmax = o.softmax and num_ch > 1
    if o.softmax and num_ch == 1:
        warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
    want_ce = o.lambda_ce > 0
    ce = focal_sum = None
    focal_alpha = o.focal_alpha
    if o.focal_softmax and focal_alpha is not None and not o.include_background and num_ch > 1:
        warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=3)
        focal_alpha = None  # as MONAI's FocalLoss(use_softmax=True)
    if prep.labels is not None and (softmax or o.sigmoid) and _FUSED_LABEL_PATH:
        fuse_ce = want_ce and softmax and o.label_smoothing == 0
        fuse_focal = o.lambda_focal > 0 and (softmax or not o.focal_softmax)
        focal = Focal((2 if o.focal_softmax else 1) if fuse_focal else 0, o.gamma, focal_alpha)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 logits: weights and sums in float32
        ce_wx = None if ce_w is None else ce_w.to(device=x.device, dtype=acc)
        inter, psum, tsum, nll, fsum = fused_label_terms(
            prep.probs, prep.labels, prep.mask, softmax=softmax, squared=o.squared_pred, ce_weight=ce_wx,
            with_ce=fuse_ce, focal=focal,
        )  # fmt: skip
        if fuse_ce:
            ce = _Mean(nll, _ce_count(prep, ce_wx))
        if fuse_focal:
            focal_sum = fsum
        terms, vol = _select(DiceTerms(inter, psum, tsum), tsum, prep.keep)
    else:
        probs = activate(x, o.sigmoid, softmax, o.other_act)
        prep = prep._replace(probs=probs.reshape(prep.probs.shape))
        terms, vol = _terms_and_volumes(prep, o.squared_pred, o.soft_label)
    if want_ce and ce is None:
        ce = _cross_entropy_parts(x, prep, o.sigmoid, ce_w, o.label_smoothing)
    extras = [] if ce is None else [(o.lambda_ce, ce)]
    if o.lambda_focal > 0:
        if focal_sum is None:
            focal_sum, count = focal_sums(x, prep, gamma=o.gamma, alpha=focal_alpha, softmax=o.focal_softmax)
        else:
            count = _voxel_counts(x, prep.mask)
        extras.append((o.lambda_focal, _focal_parts(_take_channels(focal_sum, prep.keep, 1), count, focal_w,
                                                    o.reduction)))  # fmt: skip
    return terms, vol, dice_w, extras


def _take_channels(t: torch.Tensor, keep: tuple[int, ...], dim: int) -> torch.Tensor:
    """``t`` restricted to the indices ``keep`` along ``dim``, by slicing (an index tensor built from a Python list
    would be a host-to-device copy on every step; ``keep`` is a range with at most one hole)."""
    runs: list[tuple[int, int]] = []
    for k in keep:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    parts = [t.narrow(dim, lo, hi - lo) for lo, hi in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _select(terms: DiceTerms, vol: torch.Tensor, keep: tuple[int, ...]) -> tuple[DiceTerms, torch.Tensor]:
    """Keep the channels in ``keep`` (classes on axis 1)."""
    if len(keep) == terms.intersection.shape[1]:
        return terms, vol
    return DiceTerms(*(_take_channels(t, keep, 1) for t in terms)), _take_channels(vol, keep, 1)


def _combine(dice: torch.Tensor, extras: list[tuple[float, _Mean]], o: DiceOptions) -> torch.Tensor:
    """``lambda_dice * dice + sum(lambda * term)`` over the per-voxel terms."""
    out = dice if o.lambda_dice == 1.0 else o.lambda_dice * dice
    for lam, term in extras:
        out = out + lam * term.value(o.reduction)
    return out


def _sync(
    terms: DiceTerms, vol: torch.Tensor, extras: list[tuple[float, _Mean]]
) -> tuple[DiceTerms, torch.Tensor, list[tuple[float, _Mean]]]:
    """``sync_batch``: the batch sums of every process added up, with gradient, in one collective. A no-op without
    an initialised process group (or with one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return terms, vol, extras
    from torch.distributed.nn.functional import all_reduce  # differentiable: its backward all-reduces the gradient

    parts = [*terms, vol, *(t for _, term in extras for t in term)]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in parts))
    sizes = [t.numel() for t in parts]
    flat = all_reduce(torch.cat([t.reshape(-1).to(dtype) for t in parts]))
    out = [chunk.reshape(t.shape).to(t.dtype) for chunk, t in zip(torch.split(flat, sizes), parts, strict=False)]
    c = len(terms)
    synced = [(lam, _Mean(*out[c + 1 + 2 * i: c + 3 + 2 * i])) for i, (lam, _) in enumerate(extras)]
    return DiceTerms(*out[:c]), out[c], synced


def dice_plus_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    options: DiceOptions | None = None,
    *,
    weight: Sequence[float] | float | torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Dice, Jaccard or Tversky loss, optionally plus cross entropy; see :class:`monai_gdl_plus.DicePlusLoss`.

    Args:
        input, target: as the module's ``forward``.
        options: a :class:`~monai_gdl_plus.options.DiceOptions`; or leave it None and give its fields as keywords.
        weight: static class weights (see the module).

    Returns:
        a scalar for ``"mean"``/``"sum"``; for ``"none"`` per-class values (B, C') or (C',) with ``batch=True``.

    Examples:
        >>> import torch
        >>> from monai_gdl_plus import DicePlusLoss
        >>> from monai_gdl_plus.functional import dice_plus_loss
        >>> p = torch.tensor([[[0.7, 0.0], [0.3, 1.0]]])  # (B=1, C=2, N=2) probabilities
        >>> g = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # one-hot
        >>> dice_plus_loss(p, g, reduction="none")  # class 0: 1 - 1.4 / 2.7; class 1: absent, 1.3 predicted
        tensor([[0.4815, 1.0000]])
        >>> torch.equal(dice_plus_loss(p, g, jaccard=True), DicePlusLoss(jaccard=True)(p, g))  # as the module
        True
    """
    o = _options(DiceOptions, options, kwargs)
    with autocast_off(input.device):  # sums in float32 or wider whatever autocast would cast them to
        terms, vol, dice_w, extras = _loss_parts(input, target, _weight(weight), o)
        if o.batch:
            terms, vol = DiceTerms(*(t.sum(0) for t in terms)), vol.sum(0)
        if o.sync_batch:
            terms, vol, extras = _sync(terms, vol, extras)
        if o.tversky is not None:
            f = tversky_from_terms(terms, *o.tversky, smooth_nr=o.smooth_nr, smooth_dr=o.smooth_dr)
        else:
            f = dice_from_terms(terms, o.smooth_nr, o.smooth_dr, o.jaccard)
        if dice_w is not None:
            f = f * dice_w.to(f)
        return _combine(reduce_loss(f, o.reduction), extras, o)


def generalized_dice_plus_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    options: GeneralizedDiceOptions | None = None,
    *,
    weight: Sequence[float] | float | torch.Tensor | None = None,
    focal_weight: Sequence[float] | float | torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Generalised Dice (or Tversky) loss, optionally plus cross entropy; see
    :class:`monai_gdl_plus.GeneralizedDicePlusLoss`.

    Args:
        input, target: as the module's ``forward``.
        options: a :class:`~monai_gdl_plus.options.GeneralizedDiceOptions`; or None and its fields as keywords.
        weight: static class weights (see the module).
        focal_weight: class weights of the focal term alone (``weight`` then weighs only the GDL and CE terms), as
            MONAI's ``GeneralizedDiceFocalLoss`` uses its ``weight``.

    Returns:
        a scalar for ``"mean"``/``"sum"``; for ``"none"`` one value per sample (B,), or 0-d with ``batch=True``.

    Examples:
        A large class (3 voxels) predicted right and a small one (1 voxel) half-predicted: the steeper the volume
        weighting, the more the small class counts.

        >>> import torch
        >>> from monai_gdl_plus.functional import generalized_dice_plus_loss
        >>> p = torch.tensor([[[1.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.5]]])  # (B=1, C=2, N=4) probabilities
        >>> g = torch.tensor([[[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
        >>> for w_type in ("uniform", "simple", "square"):  # 1 - 7/8, 1 - 9/11, 1 - 3/4
        ...     print(w_type, round(float(generalized_dice_plus_loss(p, g, w_type=w_type)), 4))
        uniform 0.125
        simple 0.1818
        square 0.25
    """
    o = _options(GeneralizedDiceOptions, options, kwargs)
    with autocast_off(input.device):  # sums in float32 or wider whatever autocast would cast them to
        terms, vol, dice_w, extras = _loss_parts(input, target, _weight(weight), o, _weight(focal_weight))
        if o.batch:
            terms, vol = DiceTerms(*(t.sum(0) for t in terms)), vol.sum(0)
        if o.sync_batch:
            terms, vol, extras = _sync(terms, vol, extras)
        f = generalized_dice_from_terms(
            terms, vol, w_type=o.w_type, absent_weight=o.absent_weight, static_weight=dice_w,
            normalize_weights=o.normalize_weights, smooth_nr=o.smooth_nr, smooth_dr=o.smooth_dr, jaccard=o.jaccard,
            tversky=o.tversky,
        )  # fmt: skip
        return _combine(reduce_loss(f, o.reduction), extras, o)


_O = TypeVar("_O", bound=DiceOptions)


def _options(cls: type[_O], options: _O | None, kwargs: dict) -> _O:
    if options is None:
        return cls(**kwargs)
    if kwargs:
        raise TypeError(f"give either `options` or option keywords, not both (got options and {sorted(kwargs)}).")
    if not isinstance(options, cls):
        raise TypeError(f"`options` must be a {cls.__name__}, got {type(options).__name__}.")
    return options


def _weight(weight: Sequence[float] | float | torch.Tensor | None) -> torch.Tensor | None:
    return check_weight(weight, copy=False)
