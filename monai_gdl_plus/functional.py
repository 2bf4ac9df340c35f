"""Functional core of the Dice-family losses and of the per-class Dice metric.

Tensors in, tensors out, no state. :func:`dice_plus_loss` and :func:`generalized_dice_plus_loss` -- and so every
loss of :mod:`monai_gdl_plus.losses` -- run these steps, configured by one options object
(:mod:`monai_gdl_plus.options`):

1. :func:`prepare` -- the logits viewed as (B, C, N) once, the label map (ignored voxels mapped into range) or the
   dense target, the ignore mask, the kept channels, and every value check;
2. :func:`per_class_terms` -- every per-voxel sum: intersection ``I = sum(p * g)``, prediction sum ``P = sum(p)``
   (or ``sum(p**2)``) and target sum ``G = sum(g)`` per (sample, kept class), the true volumes, and the cross-entropy
   and focal sums. The one place that chooses the route: a label map with a softmax or sigmoid takes the fused
   one-hot-free route (:mod:`monai_gdl_plus._fused`, CE and focal in the same pass), everything else the plain one
   (``monai_gdl_plus._ops.plain_terms``, through autograd);
3. :func:`extra_terms` -- the CE and focal terms as means (sums and denominators), class-weighted; the weights of
   every term come from :func:`class_weights`;
4. combine -- the batch (``batch``) and process (``sync_batch``) sums, one block for both losses, then
   :func:`dice_from_terms`, :func:`tversky_from_terms` or :func:`generalized_dice_from_terms`, plus ``lambda`` times
   each extra term;
5. :func:`reduce_loss` -- ``"none" | "mean" | "sum"``.

The metric (:class:`~monai_gdl_plus.PerClassDice`) shares the label rules (:func:`label_map`,
:func:`check_binary`, :func:`dense_ignore_mask`, :func:`check_label_range`), :func:`soft_terms` and the hard counts
of :func:`label_terms`. The device policy, the value-check primitives, the class sums, the per-voxel formulas and the
plain route's sums are defined once, in ``monai_gdl_plus._ops``: this module calls below it once per step.

Forms (MONAI 1.6.1): with ``D = P + G``,
Dice ``1 - (2I + smooth_nr) / (D + smooth_dr)``, Jaccard ``1 - (2I + smooth_nr) / (2(D - I) + smooth_dr)``,
Tversky ``1 - (I + smooth_nr) / (I + alpha (P - I) + beta (G - I) + smooth_dr)``.
References: Milletari et al. 2016 (V-Net, squared denominator); Sudre et al. 2017 (Generalised Dice); Salehi et al.
2017 (Tversky); Lin et al. 2017 (focal loss).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import torch

from monai_gdl_plus import _ops
from monai_gdl_plus._fused import fused_label_terms, soft_class_sums
from monai_gdl_plus._ops import (
    LOW_PRECISION,
    NO_FOCAL,
    CrossEntropy,
    Focal,
    SoftDice,
    autocast_off,
    checks_enabled,
    class_sums,
    counted_weight,
    on_host,
    plain_terms,
    soft_sums,
    value_check,
    wide,
)
from monai_gdl_plus._triton import kernel_traffic  # the Triton kernels' bytes and launches per step (public here)
from monai_gdl_plus.options import AbsentWeight, DiceOptions, GeneralizedDiceOptions, WassersteinDiceOptions, WType

__all__ = [
    "DiceTerms",
    "Prepared",
    "Terms",
    "WassersteinTerms",
    "Weights",
    "check_binary",
    "check_dist_matrix",
    "check_integer_labels",
    "check_label_range",
    "check_weight",
    "class_weights",
    "dense_ignore_mask",
    "dice_from_terms",
    "dice_plus_loss",
    "extra_terms",
    "gdl_weights",
    "kernel_traffic",
    "generalized_dice_from_terms",
    "generalized_dice_plus_loss",
    "generalized_wasserstein_dice_plus_loss",
    "label_map",
    "label_terms",
    "per_class_terms",
    "plain_tensor",
    "prepare",
    "reduce_loss",
    "soft_terms",
    "tversky_from_terms",
    "wasserstein_dice_from_terms",
    "wasserstein_terms",
]


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
        logits: ``input`` viewed as (B, C, N), in its own dtype (the routes compute in float32 or wider).
        labels: integer label map (B, N), ignored voxels mapped to 0; None for a dense target.
        target: dense target (B, C, N) in float32 or wider; None for a label map.
        mask: (B, N), 1 = voxel counts, 0 = ignored, float32 or wider; None without ``ignore_index``.
        keep: the channel indices that enter the Dice sums (background and an in-range ``ignore_index`` dropped).
    """

    logits: torch.Tensor
    labels: torch.Tensor | None
    target: torch.Tensor | None
    mask: torch.Tensor | None
    keep: tuple[int, ...]


class Terms(NamedTuple):
    """What :func:`per_class_terms` returns.

    Attributes:
        dice: :class:`DiceTerms` of the kept channels (B, C').
        volumes: the true volumes ``sum(g)`` of the kept channels (B, C'), the GDL weights' input.
        ce: the cross entropy as its sum over the counted voxels and its mean's denominator, or None without it.
        focal: the focal term's sums over the counted voxels, every channel (B, C), or None without it.
    """

    dice: DiceTerms
    volumes: torch.Tensor
    ce: _Mean | None = None
    focal: torch.Tensor | None = None


class Weights(NamedTuple):
    """Static class weights as each term uses them (:func:`class_weights`); None: unweighted.

    Attributes:
        dice: one per kept channel, multiplying each class's Dice (GDL: its volume weight).
        ce: one per class (C,): CE's ``weight``, or BCE's ``pos_weight``.
        focal: one per kept channel, multiplying each class's focal term.
    """

    dice: torch.Tensor | None
    ce: torch.Tensor | None
    focal: torch.Tensor | None


class _Mean(NamedTuple):
    """A per-voxel term as a sum and its mean's denominator (both sums, so that processes can add them up)."""

    num: torch.Tensor
    den: torch.Tensor

    def value(self, reduction: str) -> torch.Tensor:
        return self.num if reduction == "sum" else self.num / self.den


# --------------------------------------------------------------------------------------------------------------------
# the label rules and value checks shared with the metric
# --------------------------------------------------------------------------------------------------------------------


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """Drop tensor subclasses such as MONAI's MetaTensor (autograd-transparent; plain ops are faster)."""
    if type(x) is not torch.Tensor and isinstance(x, torch.Tensor):
        return x.as_subclass(torch.Tensor)
    return x


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
    if on_host(w.device) and checks_enabled(w) and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError(f"`weight` values must be finite and no less than 0, got {w.tolist()}.")
    return w


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
    """A floating label map must hold whole numbers: ValueError naming ``name`` (see ``_ops.value_check``)."""
    if (labels.is_floating_point() or labels.is_complex()) and checks_enabled(labels):
        value_check(
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
    elif on_host(labels.device) or validate:
        if not bool(ok):
            bad = (labels < 0) | (labels >= num_classes)
            bad = bad if valid is None else bad & valid
            raise ValueError(f"{msg}, got {torch.unique(labels[bad])[:8].tolist()}.")
    else:
        value_check(ok, msg + ".", validate)


def label_map(
    target: torch.Tensor, num_classes: int, ignore_index: int | None = None, *, name: str = "target",
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A label map as the losses and the metric read it: int64 labels (B, N) with ignored voxels mapped to 0, and
    the float32 mask (B, N) of counted voxels, or None without ``ignore_index``.

    ``target`` ``(B, 1, *spatial)`` or ``(B, *spatial)`` must hold whole numbers in [0, num_classes) or equal to
    ``ignore_index`` (:func:`check_integer_labels`, :func:`check_label_range`: ValueErrors naming ``name`` on the
    host or with ``validate``, device assertions elsewhere). While ``torch.compile`` traces, the labels are also
    clamped into range: the traced range check may raise only after the kernels that index with them ran, and an
    out-of-bounds read in a generated CPU kernel aborts the interpreter.

    Examples:
        >>> import torch
        >>> from monai_gdl_plus.functional import label_map
        >>> label_map(torch.tensor([[[0, 2, 255]]]), 3, ignore_index=255)
        (tensor([[0, 2, 0]]), tensor([[1., 1., 0.]]))
        >>> label_map(torch.tensor([[[0, 3]]]), 3)
        Traceback (most recent call last):
        ...
        ValueError: `target` label values must lie in [0, 3), got [3].
    """
    t = plain_tensor(target).reshape(target.shape[0], -1)
    check_integer_labels(t, name, validate)
    t = t.long()
    valid = None if ignore_index is None else t != ignore_index
    check_label_range(t, num_classes, ignore_index, name=name, validate=validate, valid=valid)
    if valid is not None:
        t = torch.where(valid, t, torch.zeros_like(t))
    if torch.compiler.is_compiling():
        t = t.clamp(0, num_classes - 1)  # fused into the index computation of the kernels that read with it
    return t, None if valid is None else valid.to(torch.float32)


def check_binary(
    target: torch.Tensor, mask: torch.Tensor | None = None, *, name: str = "target", why: str = "",
    validate: bool = False,
) -> None:  # fmt: skip
    """A dense target (B, C, N) must hold only 0 and 1 where ``mask`` (B, N) counts: a ValueError naming ``name`` (with
    ``why``, the condition, e.g. " unless `soft_label=True`") on the host or with ``validate``, an asynchronous
    device assertion elsewhere, nothing while ``torch.compile`` traces (see ``_ops.value_check``)."""
    if not checks_enabled(target):
        return
    counted = target if mask is None else target * mask[:, None]  # ignored voxels may hold any value
    value_check(((counted == 0) | (counted == 1)).all(), f"`{name}` must be binary (0/1){why}; got other values.",
                validate)  # fmt: skip


def dense_ignore_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor | None:
    """MONAI's ignore mask for a dense target (B, C, N): label compare for one channel; one-hot rules otherwise."""
    if ignore_index is None:
        return None
    if target.shape[1] == 1:
        return (target[:, 0] != ignore_index).to(torch.float32)
    if 0 <= ignore_index < target.shape[1]:
        return (1.0 - target[:, ignore_index]).to(torch.float32)
    return (target.sum(1) > 0).to(torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# step 1: prepare
# --------------------------------------------------------------------------------------------------------------------


def prepare(
    input: torch.Tensor, target: torch.Tensor, options: DiceOptions, mask: torch.Tensor | None = None
) -> Prepared:
    """Step 1: the logits as (B, C, N), the target's layout, the ignore mask and the kept channels, checked.

    Args:
        input: logits or probabilities ``(B, C, *spatial)``; a MetaTensor is read as a plain tensor.
        target: one-hot / binary ``(B, C, *spatial)``, or a label map ``(B, 1, *spatial)`` with ``to_onehot_y``
            (never materialised as one-hot).
        options: what the loss was built with (``to_onehot_y``, ``include_background``, ``ignore_index``,
            ``soft_label``, ``validate`` matter here).
        mask: a binary region ``(B, 1, *spatial)`` or ``(1, 1, *spatial)``
            (:class:`~monai_gdl_plus.MaskedDicePlusLoss`); voxels where it is 0 join the ignored ones.

    Raises:
        ValueError: shapes that do not match, label values outside [0, C) other than ``ignore_index``, a non-binary
            target without ``soft_label``, no channel left to score, NaN/Inf in ``input`` with ``validate=True``.

    Examples:
        >>> import torch
        >>> from monai_gdl_plus.functional import prepare
        >>> from monai_gdl_plus.options import DiceOptions
        >>> prep = prepare(torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 1], [2, 255]]]]),
        ...                DiceOptions(to_onehot_y=True, include_background=False, ignore_index=255))
        >>> prep.logits.shape, prep.labels, prep.mask, prep.keep
        (torch.Size([1, 3, 4]), tensor([[0, 1, 2, 0]]), tensor([[1., 1., 1., 0.]]), (1, 2))
    """
    x, target, o, region = plain_tensor(input), plain_tensor(target), options, mask
    _check_shapes(x, target)
    if o.validate and checks_enabled(x) and not bool(torch.isfinite(x).all()):
        raise ValueError("`input` contains NaN or Inf values (found by `validate=True`).")
    b, num_ch = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    labels = dense = None
    if _is_label_map(x, target, o.to_onehot_y):
        labels, mask = label_map(target, num_ch, o.ignore_index, validate=o.validate)
    else:
        dense = target.reshape(b, num_ch, -1)
        dense = dense.to(acc) if not dense.is_floating_point() or dense.dtype in LOW_PRECISION else dense
        mask = dense_ignore_mask(dense, o.ignore_index)
        if not o.soft_label:
            check_binary(dense, mask, why=" unless `soft_label=True`", validate=o.validate)
    if region is not None:
        region = _region(region, x, o.validate)
        mask = region if mask is None else mask * region
    keep = _kept_channels(num_ch, o.include_background, o.ignore_index)
    return Prepared(x.reshape(b, num_ch, -1), labels, dense, None if mask is None else mask.to(acc), keep)


def _region(mask: torch.Tensor, x: torch.Tensor, validate: bool) -> torch.Tensor:
    """A (B, 1, *spatial) or (1, 1, *spatial) binary mask as (B, N) float32, checked."""
    m = plain_tensor(mask)
    b = x.shape[0]
    if m.ndim != x.ndim or m.shape[1] != 1 or m.shape[0] not in (1, b) or m.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"`mask` must have shape (B, 1, *spatial) or (1, 1, *spatial) matching `input`: got mask shape "
            f"{tuple(m.shape)} and input shape {tuple(x.shape)}."
        )
    m = m.reshape(m.shape[0], 1, -1).to(torch.float32)
    check_binary(m, name="mask", validate=validate)
    return m[:, 0].expand(b, -1).contiguous()


def _is_label_map(x: torch.Tensor, target: torch.Tensor, to_onehot_y: bool) -> bool:
    """Whether ``target`` is read as a label map; its channel count checked against ``x``'s either way."""
    num_ch = x.shape[1]
    if to_onehot_y and num_ch == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=5)
    if to_onehot_y and num_ch > 1:
        if target.shape[1] != 1:
            raise ValueError(
                f"`to_onehot_y=True` expects a label map `target` of shape (B, 1, *spatial), got target shape "
                f"{tuple(target.shape)} for input shape {tuple(x.shape)}."
            )
        return True
    if target.shape[1] != num_ch:
        hint = " A label map needs `to_onehot_y=True`." if target.shape[1] == 1 else ""
        raise ValueError(
            f"`target` must have {num_ch} channels like `input` (one-hot), got target shape {tuple(target.shape)} "
            f"and input shape {tuple(x.shape)}.{hint}"
        )
    return False


def _kept_channels(num_ch: int, include_background: bool, ignore_index: int | None) -> tuple[int, ...]:
    if not include_background and num_ch == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=5)
    start = 1 if (not include_background and num_ch > 1) else 0
    keep = tuple(c for c in range(start, num_ch) if not (c == ignore_index and num_ch > 1))
    if not keep:
        raise ValueError(
            f"no class left to score: `input` has {num_ch} channels, include_background={include_background} and "
            f"`ignore_index`={ignore_index} drop them all."
        )
    return keep


# --------------------------------------------------------------------------------------------------------------------
# step 2: per-class terms
# --------------------------------------------------------------------------------------------------------------------


def per_class_terms(prep: Prepared, options: DiceOptions, weights: Weights | None = None) -> Terms:
    """Step 2: every per-voxel sum the loss needs -- the kept channels' Dice terms and true volumes, and the CE and
    focal sums -- from one of two routes; the one place that chooses.

    A label map with a softmax or sigmoid takes the fused route (``monai_gdl_plus._fused``: chunked, one-hot-free,
    with an analytic in-place backward, a custom op under ``torch.compile``), which sums the softmax CE (without
    label smoothing) and the focal term in the same pass. Anything else -- a dense target, ``other_act``, no
    activation, and the extra terms the fused pass does not take -- is summed by the plain route
    (``monai_gdl_plus._ops.plain_terms``, through autograd). ``weights``: :func:`class_weights` (the CE's).

    Examples:
        >>> import torch
        >>> from monai_gdl_plus.functional import per_class_terms, prepare
        >>> from monai_gdl_plus.options import DiceOptions
        >>> o = DiceOptions(to_onehot_y=True, softmax=True)
        >>> x, y = torch.zeros(1, 2, 4), torch.tensor([[[0, 0, 0, 1]]])  # even odds for both classes
        >>> per_class_terms(prepare(x, y, o), o).dice
        DiceTerms(intersection=tensor([[1.5000, 0.5000]]), pred_sum=tensor([[2., 2.]]), target_sum=tensor([[3., 1.]]))
    """
    o, x = options, prep.logits
    sigmoid, softmax = _activation(o, x.shape[1])
    focal = _focal_spec(o, x.shape[1])
    ce_w = None if weights is None else weights.ce
    ce = CrossEntropy(o.sigmoid, ce_w, o.label_smoothing) if o.lambda_ce > 0 else None
    fused = None
    if prep.labels is not None and (softmax or sigmoid) and _ops.FUSED_ROUTE:
        fused, ce, focal = _fused_terms(prep, o, softmax, ce, focal)
    soft = None if fused else SoftDice(sigmoid, softmax, o.other_act, o.squared_pred, o.soft_label)
    sums, ce_sums, focal_sums = plain_terms(x, prep.labels, prep.target, prep.mask, dice=soft, ce=ce, focal=focal)
    if fused is None:
        assert sums is not None  # asked for
        fused = Terms(DiceTerms(*sums[:3]), sums[3])
    dice, vol = _select(fused.dice, fused.volumes, prep.keep)
    ce_mean = fused.ce if ce_sums is None else _Mean(*ce_sums)
    return Terms(dice, vol, ce_mean, fused.focal if focal_sums is None else focal_sums)


def _activation(o: DiceOptions, num_ch: int) -> tuple[bool, bool]:
    """(sigmoid, softmax) as the routes apply them: a softmax over one channel is dropped with MONAI's warning."""
    if o.softmax and num_ch == 1:
        warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=5)
    return o.sigmoid, o.softmax and num_ch > 1


def _focal_spec(o: DiceOptions, num_ch: int) -> Focal:
    """The focal term of ``o``; a scalar alpha is dropped (with MONAI's warning) for the softmax form without
    background, as MONAI's ``FocalLoss(use_softmax=True)`` does."""
    alpha = o.focal_alpha
    if o.focal_softmax and alpha is not None and not o.include_background and num_ch > 1:
        warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=5)
        alpha = None
    return Focal((2 if o.focal_softmax else 1) if o.lambda_focal > 0 else 0, o.gamma, alpha)


def _fused_terms(
    prep: Prepared, o: DiceOptions, softmax: bool, ce: CrossEntropy | None, focal: Focal
) -> tuple[Terms, CrossEntropy | None, Focal]:
    """The fused route's terms of every channel, and the CE and focal terms it leaves to the plain route (a CE under
    a sigmoid or with label smoothing, the softmax-form focal term under a sigmoid)."""
    assert prep.labels is not None  # the route's condition
    x = prep.logits
    fuse_ce = ce is not None and softmax and ce.label_smoothing == 0
    fuse_focal = focal.kind == 1 or (focal.kind == 2 and softmax)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 logits: weights and sums in float32
    ce_w = None if ce is None or ce.weight is None or not fuse_ce else ce.weight.to(device=x.device, dtype=acc)
    inter, psum, tsum, nll, fsum = fused_label_terms(
        x, prep.labels, prep.mask, softmax=softmax, squared=o.squared_pred, ce_weight=ce_w, with_ce=fuse_ce,
        focal=focal if fuse_focal else Focal(0, focal.gamma, focal.alpha),
    )  # fmt: skip
    ce_mean = _Mean(nll, counted_weight(prep.labels, prep.mask, ce_w, x)) if fuse_ce else None
    terms = Terms(DiceTerms(inter, psum, tsum), tsum, ce_mean, fsum if fuse_focal else None)  # every channel
    return terms, None if fuse_ce else ce, NO_FOCAL if fuse_focal else focal


def soft_terms(
    probs: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    squared: bool = False,
    soft_label: bool = False,
) -> tuple[DiceTerms, torch.Tensor]:
    """Per-(sample, class) terms of activated probabilities against a label map or a dense target, and the true
    volumes ``sum(g)`` (which differ from ``G`` only for squared soft labels), by plain autograd.

    Args:
        probs: ``(B, C, *spatial)``, usually in [0, 1]; fp16/bf16 are summed in float32.
        labels: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)`` in [0, C): never expanded to a one-hot.
        target: or a dense target ``(B, C, *spatial)`` (exactly one of the two).
        mask: ``(B, *spatial)`` or ``(B, 1, *spatial)`` weights, 1 = counted, 0 = ignored.
        squared: ``sum(p**2)`` and ``sum(g**2)`` (V-Net) for the sums.
        soft_label: MONAI's soft-label intersection for a dense non-binary target.

    Returns:
        :class:`DiceTerms` of (B, C) tensors and the (B, C) volumes, in ``probs``' dtype (float32 for half inputs).

    Examples:
        A label map and its one-hot give the same terms:

        >>> import torch
        >>> from monai_gdl_plus.functional import dice_from_terms, soft_terms
        >>> p = torch.tensor([[[0.7, 0.0], [0.3, 1.0]]])  # (B=1, C=2, N=2) probabilities
        >>> terms, volumes = soft_terms(p, labels=torch.tensor([[0, 0]]))  # class 0 twice
        >>> terms
        DiceTerms(intersection=tensor([[0.7000, 0.0000]]), pred_sum=tensor([[0.7000, 1.3000]]),
                  target_sum=tensor([[2., 0.]]))
        >>> dense, _ = soft_terms(p, target=torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]))  # its one-hot (B, C, N)
        >>> all(torch.equal(a, b) for a, b in zip(terms, dense))
        True
        >>> dice_from_terms(terms)  # 1 - 1.4 / 2.7, and class 1 (absent, 1.3 predicted) near 1
        tensor([[0.4815, 1.0000]])
    """
    if (labels is None) == (target is None):
        raise TypeError("soft_terms needs exactly one of `labels` and `target`.")
    p = plain_tensor(probs)
    b, num_ch = p.shape[:2]
    p = wide(p).reshape(b, num_ch, -1)
    m = None if mask is None else plain_tensor(mask).reshape(b, -1).to(p.dtype)
    lab = None if labels is None else plain_tensor(labels).reshape(b, -1).long()
    dense = None if target is None else plain_tensor(target).reshape(b, num_ch, -1).to(p.dtype)
    with autocast_off(p.device):
        inter, psum, tsum, vol = soft_sums(p, lab, dense, m, squared, soft_label)
    return DiceTerms(inter, psum, tsum), vol


# --------------------------------------------------------------------------------------------------------------------
# step 3: class weights and the extra terms (cross entropy, focal) as means
# --------------------------------------------------------------------------------------------------------------------


def class_weights(
    prep: Prepared,
    options: DiceOptions,
    weight: torch.Tensor | None = None,
    focal_weight: torch.Tensor | None = None,
) -> Weights:
    """Static class weights (:func:`check_weight`) as each term uses them.

    Lengths follow MONAI: C (``DiceCELoss``: CE uses all, Dice drops the first without background) or, without
    background, C - 1 (``DiceLoss``: one per non-background class; CE then gives the background weight 1); a
    scalar applies to every class; lengths count classes before an in-range ``ignore_index`` channel is dropped. As
    MONAI, the Dice term takes no class weight when a single class is scored. The focal term takes
    ``focal_weight`` if given (MONAI's ``GeneralizedDiceFocalLoss`` weighs only its focal term), else ``weight``.

    Raises:
        ValueError: a length that is neither.
    """
    num_ch, o = prep.logits.shape[1], options
    dice_w, ce_w = _split_weight(weight, num_ch, o.include_background, prep.keep)
    focal_w = dice_w if focal_weight is None else _split_weight(focal_weight, num_ch, o.include_background,
                                                                prep.keep)[0]  # fmt: skip
    if num_ch - (0 if o.include_background or num_ch == 1 else 1) == 1:
        dice_w = None
    return Weights(dice_w, ce_w, focal_w)


def extra_terms(prep: Prepared, terms: Terms, options: DiceOptions, weights: Weights) -> list[tuple[float, _Mean]]:
    """Step 3: the CE and focal terms of ``terms`` as ``(lambda, (sum, denominator))`` pairs (none without them),
    the focal term of the kept channels, class-weighted and reduced as MONAI's ``FocalLoss`` reduces it: ``"mean"``
    over every (sample, class, counted voxel), ``"sum"`` the sum of the per-(sample, class) means over voxels."""
    o, extras = options, []
    if terms.ce is not None:
        extras.append((o.lambda_ce, terms.ce))
    if terms.focal is not None:
        sums, count = _take_channels(terms.focal, prep.keep, 1), _voxel_counts(prep)
        if weights.focal is not None:
            sums = sums * weights.focal.to(sums)
        if o.reduction == "sum":  # per-sample means: their sum is what processes add up
            focal = _Mean((sums / count[:, None].clamp_min(1.0)).sum(), count.sum())
        else:
            focal = _Mean(sums.sum(), (count.sum() * sums.shape[1]).clamp_min(1.0))
        extras.append((o.lambda_focal, focal))
    return extras


def _voxel_counts(prep: Prepared) -> torch.Tensor:
    """Counted voxels per sample (B,), float32 or wider."""
    x = prep.logits
    acc = torch.promote_types(x.dtype, torch.float32)
    if prep.mask is None:
        return torch.full((x.shape[0],), x.shape[-1], dtype=acc, device=x.device)
    return prep.mask.sum(-1).to(acc)


# --------------------------------------------------------------------------------------------------------------------
# step 4: combine; step 5: reduce
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
    """Static weights for the Dice sums (one per kept channel) and the CE term (one per class): see
    :func:`class_weights` for the lengths accepted."""
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


def _all_reduce(flat: torch.Tensor) -> torch.Tensor:
    """The differentiable all-reduce (its backward all-reduces the gradient), eager under torch.compile on every torch:
    dynamo 2.11 traces its autograd.Function with a wrong backward (the input gradient of a compiled sync_batch loss
    was off), and from 2.13 on torch refuses to trace it (a graph break). Disabled here, when called, not by a
    decorator: ``torch.compiler.disable`` imports dynamo (and with it triton), which ``import monai_gdl_plus`` must
    not."""
    from torch.distributed.nn.functional import all_reduce

    return torch.compiler.disable(all_reduce)(flat)


def _sync(
    terms: DiceTerms, vol: torch.Tensor, extras: list[tuple[float, _Mean]]
) -> tuple[DiceTerms, torch.Tensor, list[tuple[float, _Mean]]]:
    """``sync_batch``: the batch sums of every process added up, with gradient, in one collective. A no-op without
    an initialised process group (or with one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return terms, vol, extras
    parts = [*terms, vol, *(t for _, term in extras for t in term)]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in parts))
    sizes = [t.numel() for t in parts]
    flat = _all_reduce(torch.cat([t.reshape(-1).to(dtype) for t in parts]))
    out = [chunk.reshape(t.shape).to(t.dtype) for chunk, t in zip(torch.split(flat, sizes), parts, strict=False)]
    c = len(terms)
    synced = [(lam, _Mean(*out[c + 1 + 2 * i: c + 3 + 2 * i])) for i, (lam, _) in enumerate(extras)]
    return DiceTerms(*out[:c]), out[c], synced


# --------------------------------------------------------------------------------------------------------------------
# the metric's hard counts
# --------------------------------------------------------------------------------------------------------------------


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
    if on_host(idx.device) and not torch.compiler.is_compiling():
        counts = torch.bincount(idx, minlength=bins + 1)
    else:  # bincount sizes its output from the data (a host sync on GPUs); a fixed-size scatter does not
        counts = torch.zeros(bins + 1, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    conf = counts[:bins].view(b, c, c)  # [sample, true class, predicted class]
    return DiceTerms(conf.diagonal(dim1=1, dim2=2), conf.sum(1), conf.sum(2))


# --------------------------------------------------------------------------------------------------------------------
# the two losses as functions
# --------------------------------------------------------------------------------------------------------------------


def _batch_terms(
    input: torch.Tensor,
    target: torch.Tensor,
    o: DiceOptions,
    weight: torch.Tensor | None,
    focal_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[DiceTerms, torch.Tensor, Weights, list[tuple[float, _Mean]]]:
    """Steps 1-3 and the batch/sync block both losses share: the terms, volumes, class weights and extra terms,
    summed over the batch (``batch``) and over every process (``sync_batch``). No autocast context is needed: each
    route sums in float32 or wider under autocast by itself (the plain one widens and is element-wise, which autocast
    never casts down; the fused one turns autocast off around its ``bmm``; the Triton kernels accumulate in float32)."""
    prep = prepare(input, target, o, mask)
    weights = class_weights(prep, o, weight, focal_weight)
    terms = per_class_terms(prep, o, weights)
    extras = extra_terms(prep, terms, o, weights)
    dice, vol = terms.dice, terms.volumes
    if o.batch:
        dice, vol = DiceTerms(*(t.sum(0) for t in dice)), vol.sum(0)
    if o.sync_batch:
        dice, vol, extras = _sync(dice, vol, extras)
    return dice, vol, weights, extras


def dice_plus_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    options: DiceOptions | None = None,
    *,
    weight: Sequence[float] | float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Dice, Jaccard or Tversky loss, optionally plus cross entropy; see :class:`monai_gdl_plus.DicePlusLoss`.

    Args:
        input, target: as the module's ``forward``.
        options: a :class:`~monai_gdl_plus.options.DiceOptions`; or leave it None and give its fields as keywords.
        weight: static class weights (see the module).
        mask: a binary region (see :class:`~monai_gdl_plus.MaskedDicePlusLoss`), or None.

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
    terms, _, weights, extras = _batch_terms(input, target, o, _weight(weight), mask=mask)
    if o.tversky is not None:
        f = tversky_from_terms(terms, *o.tversky, smooth_nr=o.smooth_nr, smooth_dr=o.smooth_dr)
    else:
        f = dice_from_terms(terms, o.smooth_nr, o.smooth_dr, o.jaccard)
    if weights.dice is not None:
        f = f * weights.dice.to(f)
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
    terms, vol, weights, extras = _batch_terms(input, target, o, _weight(weight), _weight(focal_weight))
    f = generalized_dice_from_terms(
        terms, vol, w_type=o.w_type, absent_weight=o.absent_weight, static_weight=weights.dice,
        normalize_weights=o.normalize_weights, smooth_nr=o.smooth_nr, smooth_dr=o.smooth_dr, jaccard=o.jaccard,
        tversky=o.tversky,
    )  # fmt: skip
    return _combine(reduce_loss(f, o.reduction), extras, o)


_O = TypeVar("_O", DiceOptions, GeneralizedDiceOptions, WassersteinDiceOptions)


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


# --------------------------------------------------------------------------------------------------------------------
# the generalised Wasserstein Dice loss (Fidon et al. 2017; GDL weighting: Tilborghs et al. 2020)
# --------------------------------------------------------------------------------------------------------------------


class WassersteinTerms(NamedTuple):
    """Per-(sample, true class) sums of the generalised Wasserstein Dice loss, (B, C) or (C,) once summed over the
    batch, in float32 or wider.

    Attributes:
        distance: ``W_k``, the sum over the counted voxels labelled k of their Wasserstein distance
            ``w_n = sum_c M[k, c] p_{c,n}``.
        volume: ``V_k``, the number of counted voxels labelled k (no gradient).
    """

    distance: torch.Tensor
    volume: torch.Tensor


def check_dist_matrix(
    dist_matrix: torch.Tensor | Sequence[Sequence[float]] | object, num_classes: int | None = None, *,
    validate: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The class distance matrix ``M`` (a C x C tensor, numpy array or nested sequence) as a floating tensor divided
    by its maximum, as MONAI's ``GeneralizedWassersteinDiceLoss`` takes it (a matrix whose maximum is 1 is unchanged).

    Shapes are checked always: square, and C x C for ``num_classes`` C. Values -- finite, no less than 0, a
    positive maximum -- where a value check costs no sync (see ``_ops.value_check``; device assertions elsewhere,
    skipped while ``torch.compile`` traces).

    Raises:
        TypeError: not convertible to a tensor.
        ValueError: not square, not C x C, or bad values, naming ``dist_matrix``.

    Examples:
        >>> import numpy as np
        >>> from monai_gdl_plus.functional import check_dist_matrix
        >>> check_dist_matrix(np.array([[0.0, 2.0], [2.0, 0.0]]))
        tensor([[0., 1.],
                [1., 0.]], dtype=torch.float64)
        >>> check_dist_matrix([[0.0, 1.0], [1.0, 0.0]], num_classes=3)
        Traceback (most recent call last):
        ...
        ValueError: `dist_matrix` must be C x C for the C = 3 channels of `input`, got shape (2, 2).
    """
    try:
        m = torch.as_tensor(dist_matrix)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"`dist_matrix` must be a C x C tensor or array of distances, got {dist_matrix!r}.") from e
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"`dist_matrix` must be a square C x C matrix, got shape {tuple(m.shape)}.")
    if num_classes is not None and m.shape[0] != num_classes:
        raise ValueError(
            f"`dist_matrix` must be C x C for the C = {num_classes} channels of `input`, got shape {tuple(m.shape)}."
        )
    m = m if m.is_floating_point() else m.to(torch.float32)
    top = m.amax()
    if checks_enabled(m):
        ok = torch.isfinite(m).all() & (m >= 0).all() & (top > 0)
        value_check(ok, "`dist_matrix` must hold finite distances no less than 0 with a positive maximum.", validate)
    return m / top


def wasserstein_terms(
    probs: torch.Tensor, labels: torch.Tensor, dist_matrix: torch.Tensor, mask: torch.Tensor | None = None
) -> WassersteinTerms:
    """:class:`WassersteinTerms` of probabilities ``probs`` (B, C, N) against labels (B, N) in [0, C), without a
    one-hot and without the (B, C, N) map of gathered distances: the definition, through autograd.

    ``W_k = sum_c M[k, c] S_{k,c}`` from the soft class sums ``S_{k,c} = sum_{n: y_n = k} p_{c,n}``: one class sum
    per channel (``_ops.class_sums``), so the autograd graph keeps only ``probs`` and ``labels``. ``mask`` (B, N),
    binary, 1 = counted: ignored voxels go to one extra bin that is dropped. The loss takes the same sums from the
    logits chunk by chunk, with an analytic backward (``_fused.soft_class_sums``; tested against this function).

    Examples:
        One voxel of class 0 predicted 0.25 / 0.75, one of class 1 predicted certainly; ``M`` = 1 off the diagonal:

        >>> import torch
        >>> from monai_gdl_plus.functional import wasserstein_terms
        >>> p = torch.tensor([[[0.25, 0.0], [0.75, 1.0]]])  # (B=1, C=2, N=2)
        >>> wasserstein_terms(p, torch.tensor([[0, 1]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        WassersteinTerms(distance=tensor([[0.7500, 0.0000]]), volume=tensor([[1., 1.]]))
    """
    c = probs.shape[1]
    labels, bins = _binned(labels, mask, c)
    with autocast_off(probs.device):
        # (B, K, C): channel c's probabilities summed per true class k; unbind's backward stacks the C gradients once
        soft = torch.stack([class_sums(p, labels, bins) for p in probs.unbind(1)], -1)
        return _distance_terms(soft, labels, bins, dist_matrix, probs.dtype)


def _binned(labels: torch.Tensor, mask: torch.Tensor | None, c: int) -> tuple[torch.Tensor, int]:
    """The labels with ignored voxels (``mask`` 0) moved to one extra bin ``c``, and the number of bins."""
    if mask is None:
        return labels, c
    return torch.where(mask > 0, labels, c), c + 1


def _distance_terms(
    soft: torch.Tensor, labels: torch.Tensor, bins: int, dist_matrix: torch.Tensor, dtype: torch.dtype
) -> WassersteinTerms:
    """:class:`WassersteinTerms` from the soft class sums ``soft`` (B, bins, C), the extra bin dropped."""
    c = soft.shape[-1]
    distance = (soft[:, :c] * dist_matrix.to(soft)).sum(-1)
    volume = class_sums(None, labels, bins)[:, :c]
    return WassersteinTerms(distance.to(dtype), volume.to(dtype))


def wasserstein_dice_from_terms(
    terms: WassersteinTerms, weighting_mode: str = "default", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5
) -> torch.Tensor:
    """Generalised Wasserstein Dice loss ``1 - (2 TP + smooth_nr) / (D + smooth_dr)`` from :class:`WassersteinTerms`.

    With class weights ``a_k`` the true positives are ``TP = sum_k a_k (V_k - W_k)`` (the voxels' ``1 - w_n``);
    ``"default"`` (Fidon et al. 2017): ``a_0 = 0``, ``a_k = 1`` otherwise, ``D = 2 TP + sum_k W_k`` (every voxel's
    error); ``"GDL"`` (Tilborghs et al. 2020): ``a_k = 1 / (V_k + 1)``, ``D = sum_k a_k (2 V_k - W_k)``.

    Returns:
        (B,), or 0-d for terms summed over the batch.
    """
    w, v = terms
    if weighting_mode == "GDL":
        alpha = 1.0 / (v.detach() + 1.0)
        tp = (alpha * (v - w)).sum(-1)
        den = (alpha * (2.0 * v - w)).sum(-1)
    else:
        tp = (v[..., 1:] - w[..., 1:]).sum(-1)
        den = 2.0 * tp + w.sum(-1)
    return 1.0 - (2.0 * tp + smooth_nr) / (den + smooth_dr)


def generalized_wasserstein_dice_plus_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    dist_matrix: torch.Tensor | Sequence[Sequence[float]] | object,
    options: WassersteinDiceOptions | None = None,
    **kwargs,
) -> torch.Tensor:
    """Generalised Wasserstein Dice loss; see :class:`monai_gdl_plus.GeneralizedWassersteinDicePlusLoss`.

    Steps: the label map (:func:`label_map`: range checks, ignored voxels), the terms of :func:`wasserstein_terms`
    of the softmax of ``input`` (taken from the logits chunk by chunk, with an analytic backward), the batch
    (``batch``) and process (``sync_batch``) sums, then :func:`wasserstein_dice_from_terms` and :func:`reduce_loss`.
    ``dist_matrix`` is checked and divided by its maximum here (:func:`check_dist_matrix`).

    Args:
        input: logits ``(B, C, *spatial)``.
        target: labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        dist_matrix: C x C class distances.
        options: a :class:`~monai_gdl_plus.options.WassersteinDiceOptions`; or None and its fields as keywords.

    Returns:
        a scalar for ``"mean"``/``"sum"``; for ``"none"`` one value per sample (B,), or 0-d with ``batch=True``.

    Examples:
        >>> import torch
        >>> from monai.losses import GeneralizedWassersteinDiceLoss
        >>> from monai_gdl_plus.functional import generalized_wasserstein_dice_plus_loss
        >>> m = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.5], [1.0, 0.5, 0.0]])
        >>> x, y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1])
        >>> y = y.repeat(2, 4, 1)  # (B=2, 4, 4) labels
        >>> ours = generalized_wasserstein_dice_plus_loss(x, y, m, weighting_mode="GDL")
        >>> torch.allclose(ours, GeneralizedWassersteinDiceLoss(m, weighting_mode="GDL")(x, y))
        True
    """
    o = _options(WassersteinDiceOptions, options, kwargs)
    x, t = plain_tensor(input), plain_tensor(target)
    if x.ndim < 2:
        raise ValueError(f"`input` must have shape (B, C, *spatial), got {tuple(x.shape)}.")
    b, c = x.shape[:2]
    if t.shape != x.shape[:1] + x.shape[2:] and t.shape != (b, 1, *x.shape[2:]):
        raise ValueError(
            f"`target` must be a label map of shape (B, *spatial) or (B, 1, *spatial) matching `input`: got target "
            f"shape {tuple(t.shape)} and input shape {tuple(x.shape)}."
        )
    if o.validate and checks_enabled(x) and not bool(torch.isfinite(x).all()):
        raise ValueError("`input` contains NaN or Inf values (found by `validate=True`).")
    with autocast_off(x.device):  # sums in float32 or wider whatever autocast would cast them to
        m = check_dist_matrix(dist_matrix, c, validate=o.validate).to(x.device)
        labels, mask = label_map(t, c, o.ignore_index, validate=o.validate)
        binned, bins = _binned(labels, mask, c)
        soft = soft_class_sums(x.reshape(b, c, -1), binned, bins)
        terms = _distance_terms(soft, binned, bins, m, torch.promote_types(x.dtype, torch.float32))
        if o.batch:
            terms = WassersteinTerms(*(s.sum(0) for s in terms))
        if o.sync_batch:
            terms = _sync_wasserstein(terms)
        f = wasserstein_dice_from_terms(terms, o.weighting_mode, o.smooth_nr, o.smooth_dr)
        return reduce_loss(f, o.reduction)


def _sync_wasserstein(terms: WassersteinTerms) -> WassersteinTerms:
    """``sync_batch``: the batch sums of every process added up, with gradient, in one collective (a no-op without an
    initialised process group, or with one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return terms
    both = _all_reduce(torch.stack([terms.distance, terms.volume.to(terms.distance.dtype)]))
    return WassersteinTerms(both[0], both[1].to(terms.volume.dtype))
