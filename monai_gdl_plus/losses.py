"""Drop-in Dice-family losses for MONAI: thin ``nn.Module`` wrappers over :mod:`monai_gdl_plus.functional`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn.modules.loss import _Loss

from monai_gdl_plus import functional as GF

__all__ = ["DicePlusLoss", "GeneralizedDicePlusLoss"]


class _DiceFamilyLoss(_Loss):
    """Shared construction: checks once, keeps ``weight`` as a buffer, shows its arguments in ``repr``."""

    class_weight: torch.Tensor | None
    options: dict

    def __init__(self, reduction: str, weight, options: dict) -> None:
        super().__init__(reduction=reduction)
        self.register_buffer("class_weight", GF.check_weight(weight))
        self.options = options

    def extra_repr(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return shown if self.class_weight is None else f"{shown}, weight={self.class_weight.tolist()}"


class DicePlusLoss(_DiceFamilyLoss):
    """Dice loss (Milletari et al. 2016), a drop-in for ``monai.losses.DiceLoss`` and ``DiceCELoss``.

    Per sample and class: ``1 - (2 sum(p g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` (``sum(p**2) + sum(g**2)``
    with ``squared_pred``; Jaccard ``1 - (2I + smooth_nr) / (2(D - I) + smooth_dr)`` with ``jaccard``), optionally
    ``lambda_dice * dice + lambda_ce * CE``.

    With MONAI's arguments the value and gradient equal MONAI's ``DiceLoss`` (``lambda_ce=0``) or ``DiceCELoss``,
    except for the documented departures: a non-binary dense target without ``soft_label`` is a ValueError;
    ``ignore_index`` in [0, C) also drops that class's channel; with ``sigmoid=True`` and C > 1 the CE term is
    per-channel BCE-with-logits; ``reduction="none"`` returns per-class values (not a broadcastable B×C×1×…).

    Args:
        include_background: keep channel 0 in the Dice sums.
        to_onehot_y: ``target`` is a label map (B, 1, *spatial) of C classes; it is never expanded to a dense one-hot.
        sigmoid: apply a sigmoid to ``input`` (multi-label / one foreground channel).
        softmax: apply a softmax over channels (one class per voxel). Ignored with a warning for one channel.
        other_act: any other activation callable (e.g. ``torch.tanh``); at most one of the three.
        squared_pred: squared (V-Net) denominator ``sum(p**2) + sum(g**2)`` instead of ``sum(p) + sum(g)``.
        jaccard: soft IoU instead of Dice.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        batch: sum the terms over the batch before dividing.
        weight: static class weights multiplying each class's Dice: a scalar, one value per kept class
            (C - 1 without background, as ``DiceLoss``) or one per class (C, as ``DiceCELoss``: CE uses all, Dice
            drops the first without background). With length C - 1 the CE background weight is 1. Lengths count
            classes before an in-range ``ignore_index`` channel is dropped. Stored as a buffer.
        soft_label: allow non-binary targets (MONAI's soft-label formulation).
        ignore_index: label value whose voxels are left out of every sum and of the CE term (255, -1, or a class
            index, whose channel is then dropped). Masking is applied after the activation.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term (softmax CE with class ``weight``, or BCE-with-logits with
            ``pos_weight=weight`` for sigmoid / one channel), computed from the same logits. 0 skips it.
        label_smoothing: CE label smoothing in [0, 1].
        validate: run every value check even on an accelerator (synchronising), and scan ``input`` for NaN/Inf.

    Shapes:
        input (B, C, *S); target (B, C, *S) one-hot or (B, 1, *S) labels with ``to_onehot_y``.
        Output: scalar; with ``reduction="none"`` (B, C') or (C',) with ``batch=True`` (C' = kept classes).

    Raises:
        ValueError / TypeError at construction for bad options; ValueError in ``forward`` for bad shapes and values.

    Example:
        >>> loss = DicePlusLoss(to_onehot_y=True, softmax=True)
        >>> x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8))
        >>> float(loss(x, y)) <= 1.0
        True
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 0.0,
        label_smoothing: float = 0.0,
        validate: bool = False,
    ) -> None:
        opts = GF.check_args(
            sigmoid=sigmoid, softmax=softmax, other_act=other_act, reduction=reduction, smooth_nr=smooth_nr,
            smooth_dr=smooth_dr, lambda_dice=lambda_dice, lambda_ce=lambda_ce, label_smoothing=label_smoothing,
            ignore_index=ignore_index,
        )  # fmt: skip
        options = dict(
            include_background=bool(include_background), to_onehot_y=bool(to_onehot_y), sigmoid=bool(sigmoid),
            softmax=bool(softmax), other_act=other_act, squared_pred=bool(squared_pred), jaccard=bool(jaccard),
            reduction=opts["reduction"], smooth_nr=float(smooth_nr), smooth_dr=float(smooth_dr), batch=bool(batch),
            soft_label=bool(soft_label), ignore_index=ignore_index, lambda_dice=float(lambda_dice),
            lambda_ce=float(lambda_ce), label_smoothing=float(label_smoothing), validate=bool(validate),
        )  # fmt: skip
        super().__init__(opts["reduction"], weight, options)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``input`` (logits or probabilities) against ``target``; see the class docstring for shapes."""
        return GF._dice_plus_loss(input, target, weight=self.class_weight, **self.options)


class GeneralizedDicePlusLoss(_DiceFamilyLoss):
    """Generalised Dice loss (Sudre et al. 2017), a drop-in for ``monai.losses.GeneralizedDiceLoss``.

    ``1 - (2 sum_c w_c I_c + smooth_nr) / (sum_c w_c (P_c + G_c) + smooth_dr)`` per sample (or per batch with
    ``batch=True``), with class weights ``w_c`` from the true volumes ``V_c``: ``1/V_c**2`` (``"square"``),
    ``1/V_c`` (``"simple"``) or 1 (``"uniform"``).

    Weights, in this order: volume weights; absent classes (``V_c = 0``) get ``absent_weight`` (``"max"``: the
    largest weight among present classes, MONAI/NiftyNet behaviour; ``"zero"``; or a float raw weight); then
    x static ``weight``; then, with ``normalize_weights=True`` (default), division by their sum over classes so
    the smoothing terms keep their intended size at any volume. ``normalize_weights=False`` reproduces MONAI's
    values exactly, except for the empty-sample rule and the departures listed in :class:`DicePlusLoss`.

    Empty-sample rule: a sample in which *no* included class is present is scored as the soft count of
    false-positive voxels ``S = sum_c P_c`` against one voxel, ``S / (S + 1)``: 0 for an empty prediction, 0.5
    for one confidently wrong voxel, towards 1 for more, with gradient ``1 / (S + 1)**2`` (MONAI returns 0 with
    zero gradient there, and any Dice form saturates with a vanishing gradient).

    Args:
        include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, smooth_nr, smooth_dr, batch,
            soft_label: as in ``monai.losses.GeneralizedDiceLoss``.
        w_type: ``"square"`` (default), ``"simple"`` or ``"uniform"``.
        squared_pred: squared denominator ``sum(p**2) + sum(g**2)`` (weights still use ``V = sum(g)``).
        jaccard: generalised soft IoU instead of Dice.
        weight: static class weights multiplying the volume weights (same length rules as :class:`DicePlusLoss`),
            and CE/BCE class weights.
        ignore_index: as in :class:`DicePlusLoss`.
        absent_weight: ``"max"``, ``"zero"`` or a float >= 0.
        normalize_weights: divide the weights by their sum per sample (per batch with ``batch=True``).
        lambda_dice, lambda_ce, label_smoothing, validate: as in :class:`DicePlusLoss`.

    Shapes:
        input (B, C, *S); target (B, C, *S) or (B, 1, *S) labels with ``to_onehot_y``.
        Output: scalar; with ``reduction="none"`` (B,), or 0-d with ``batch=True``.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        w_type: str = "square",
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        *,
        squared_pred: bool = False,
        jaccard: bool = False,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        ignore_index: int | None = None,
        absent_weight: str | float = "max",
        normalize_weights: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 0.0,
        label_smoothing: float = 0.0,
        validate: bool = False,
    ) -> None:
        opts = GF.check_args(
            sigmoid=sigmoid, softmax=softmax, other_act=other_act, reduction=reduction, smooth_nr=smooth_nr,
            smooth_dr=smooth_dr, lambda_dice=lambda_dice, lambda_ce=lambda_ce, label_smoothing=label_smoothing,
            ignore_index=ignore_index, w_type=w_type, absent_weight=absent_weight,
        )  # fmt: skip
        options = dict(
            include_background=bool(include_background), to_onehot_y=bool(to_onehot_y), sigmoid=bool(sigmoid),
            softmax=bool(softmax), other_act=other_act, w_type=opts["w_type"], reduction=opts["reduction"],
            smooth_nr=float(smooth_nr), smooth_dr=float(smooth_dr), batch=bool(batch), soft_label=bool(soft_label),
            squared_pred=bool(squared_pred), jaccard=bool(jaccard), ignore_index=ignore_index,
            absent_weight=opts["absent_weight"], normalize_weights=bool(normalize_weights),
            lambda_dice=float(lambda_dice), lambda_ce=float(lambda_ce), label_smoothing=float(label_smoothing),
            validate=bool(validate),
        )  # fmt: skip
        super().__init__(opts["reduction"], weight, options)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``input`` (logits or probabilities) against ``target``; see the class docstring for shapes."""
        return GF._generalized_dice_plus_loss(input, target, weight=self.class_weight, **self.options)
