"""Drop-in Dice-family losses for MONAI: thin ``nn.Module`` wrappers over :mod:`monai_gdl_plus.functional`.

Two base classes take every term as an argument -- :class:`DicePlusLoss` (per-class Dice, Jaccard or Tversky) and
:class:`GeneralizedDicePlusLoss` (class-weighted sums) -- and the other MONAI names are presets of them: MONAI's
arguments in MONAI's positional order with MONAI's defaults, mapped onto the same options
(:mod:`monai_gdl_plus.options`). Renaming ``monai.losses.<Name>Loss`` to ``monai_gdl_plus.<Name>PlusLoss`` keeps the
value and the gradient.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch.nn.modules.loss import _Loss

from monai_gdl_plus import functional as GF
from monai_gdl_plus.options import DiceOptions, GeneralizedDiceOptions, WassersteinDiceOptions

__all__ = [
    "DiceCEPlusLoss",
    "DiceFocalPlusLoss",
    "DicePlusLoss",
    "GeneralizedDiceFocalPlusLoss",
    "GeneralizedDicePlusLoss",
    "GeneralizedWassersteinDicePlusLoss",
    "MaskedDicePlusLoss",
    "TverskyPlusLoss",
]

_P = inspect.Parameter


class _OptionsLoss(_Loss):
    """A loss configured by one frozen options object (``self.options``), whose fields read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            options = self.__dict__.get("options")
            if options is not None and name in {f.name for f in dataclasses.fields(options)}:
                return getattr(options, name)
            raise


class _DiceFamilyLoss(_OptionsLoss):
    """Shared construction: arguments bound against the class's MONAI-ordered signature, checked once into the
    options object, ``weight`` kept as a buffer; options readable as attributes (``loss.lambda_ce``)."""

    options_class: ClassVar[type[DiceOptions]] = DiceOptions
    function: ClassVar[Any] = staticmethod(GF.dice_plus_loss)
    positional: ClassVar[tuple[str, ...]] = ()  # MONAI's positional order, in this class's argument names
    defaults: ClassVar[dict[str, Any]] = {}  # this class's own arguments and defaults that differ from the options'
    hidden: ClassVar[tuple[str, ...]] = ()  # option fields this class sets itself
    __signature__: ClassVar[inspect.Signature]

    options: DiceOptions
    class_weight: torch.Tensor | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = {f.name: f.default for f in dataclasses.fields(cls.options_class)}
        fields["weight"] = None
        known = {**fields, **cls.defaults}
        params = [_P(n, _P.POSITIONAL_OR_KEYWORD, default=known[n]) for n in cls.positional]
        rest = [n for n in known if n not in cls.positional and n not in cls.hidden]
        params += [_P(n, _P.KEYWORD_ONLY, default=known[n]) for n in rest]
        cls.__signature__ = inspect.Signature(params)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {e} (arguments: {self.__signature__}).") from None
        bound.apply_defaults()
        values = self._to_options(dict(bound.arguments))
        weight = values.pop("weight")
        options = self.options_class(**values)
        super().__init__(reduction=options.reduction)
        self.options = options
        self.register_buffer("class_weight", GF.check_weight(weight))

    @classmethod
    def _to_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """This class's argument names to the options' (presets rename some)."""
        return values

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``input`` (logits or probabilities) against ``target``; see the class docstring for shapes."""
        return type(self).function(input, target, self.options, weight=self.class_weight)

    def extra_repr(self) -> str:
        shown = self.options.shown()
        if self.class_weight is None:
            return shown
        return f"{shown}, weight={self.class_weight.tolist()}" if shown else f"weight={self.class_weight.tolist()}"


_DICE_ORDER = ("include_background", "to_onehot_y", "sigmoid", "softmax", "other_act")


class DicePlusLoss(_DiceFamilyLoss):
    """Dice loss (Milletari et al. 2016), a drop-in for ``monai.losses.DiceLoss``.

    Per sample and class: ``1 - (2 sum(p g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` (``sum(p**2) + sum(g**2)``
    with ``squared_pred``; Jaccard ``1 - (2I + smooth_nr) / (2(D - I) + smooth_dr)`` with ``jaccard``; Tversky with
    ``tversky``), optionally ``lambda_dice * dice + lambda_ce * CE``.

    With MONAI's arguments the value and gradient equal MONAI's ``DiceLoss`` (``lambda_ce=0``) or ``DiceCELoss``,
    except for the documented departures: a non-binary dense target without ``soft_label`` is a ValueError;
    ``ignore_index`` in [0, C) also drops that class's channel; with ``sigmoid=True`` and C > 1 the CE term is
    per-channel BCE-with-logits; ``reduction="none"`` returns per-class values (not a broadcastable B×C×1×…).

    Positional arguments in ``DiceLoss``'s order; every argument is also an attribute (``loss.lambda_ce``).

    Args:
        include_background: keep channel 0 in the Dice sums.
        to_onehot_y: ``target`` is a label map ``(B, 1, *spatial)`` of C classes; it is never expanded to a dense
            one-hot.
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
        tversky: ``(alpha, beta)``: the Tversky loss (Salehi et al. 2017)
            ``1 - (I + smooth_nr) / (I + alpha FP + beta FN + smooth_dr)``, ``FP = P - I``, ``FN = G - I``, instead of
            Dice (not with ``jaccard`` or ``squared_pred``); :class:`TverskyPlusLoss` is the preset.
        lambda_focal: weight of the focal term (Lin et al. 2017) computed from the same logits, in MONAI
            ``FocalLoss``'s form as its ``DiceFocalLoss`` uses it: per element and class, sigmoid form
            ``(1 - p_t)**gamma * BCE(x, t)`` whatever the Dice activation, class ``weight``, ignored voxels left out
            (the mean is over counted voxels x kept classes); ``"sum"`` adds the per-(sample, class) means over
            voxels, as MONAI does. 0 skips it; :class:`DiceFocalPlusLoss` is the preset.
        gamma: focal exponent.
        focal_alpha: alpha-balance of the focal term: ``alpha`` on positives, ``1 - alpha`` on negatives (softmax
            form: ``1 - alpha`` on the background class, ``alpha`` on the others).
        focal_softmax: the softmax form ``-(1 - p_y)**gamma log p_y`` instead (MONAI ``FocalLoss(use_softmax=True)``).
        sync_batch: with ``batch=True``, add up the batch terms (per-class sums, CE and focal sums and their
            counts) of every process of the default ``torch.distributed`` group, with gradient, in one
            ``all_reduce``: the value is one process's on the global batch, and after DDP's gradient averaging the
            parameters' gradients are one process's. Without an initialised process group, the plain batch loss.
        validate: run every value check even on an accelerator (synchronising), and scan ``input`` for NaN/Inf.

    Shapes:
        input ``(B, C, *S)``; target ``(B, C, *S)`` one-hot or ``(B, 1, *S)`` labels with ``to_onehot_y``.
        Output: scalar; with ``reduction="none"`` (B, C') or (C',) with ``batch=True`` (C' = kept classes).

    Raises:
        ValueError: at construction for a bad option value (naming the argument); in ``forward`` for bad shapes and
            values.
        TypeError: at construction for an argument of the wrong type or an unknown argument.

    Examples:
        Soft Dice of probabilities, by hand: overlap 0.7, sums 0.7 + 2, so the loss is ``1 - 1.4 / 2.7``; a perfect
        prediction scores 0.

        >>> import torch
        >>> from monai_gdl_plus import DicePlusLoss
        >>> p = torch.tensor([[[0.7, 0.0]]])  # (B=1, C=1, N=2): foreground probabilities
        >>> g = torch.tensor([[[1.0, 1.0]]])
        >>> DicePlusLoss()(p, g)
        tensor(0.4815)
        >>> DicePlusLoss()(g, g)
        tensor(0.)

        Logits and a label map, as MONAI's ``DiceLoss`` takes them, give MONAI's value (the label map is never
        expanded to one-hot here):

        >>> from monai.losses import DiceLoss
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)  # logits (B, C, D, H, W)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)  # labels (B, 1, D, H, W)
        >>> loss = DicePlusLoss(to_onehot_y=True, softmax=True)
        >>> torch.allclose(loss(x, y), DiceLoss(to_onehot_y=True, softmax=True)(x, y))
        True
        >>> DicePlusLoss(to_onehot_y=True, softmax=True, reduction="none")(x, y).shape  # per (sample, class)
        torch.Size([2, 3])
    """

    positional: ClassVar[tuple[str, ...]] = (
        *_DICE_ORDER, "squared_pred", "jaccard", "reduction", "smooth_nr", "smooth_dr", "batch", "weight",
        "soft_label", "ignore_index",
    )  # fmt: skip


class DiceCEPlusLoss(DicePlusLoss):
    """``DicePlusLoss`` with ``monai.losses.DiceCELoss``'s arguments, order and defaults (``lambda_ce=1``).

    ``lambda_dice * Dice + lambda_ce * CE``; every :class:`DicePlusLoss` extension is a keyword argument. As in
    ``DiceCELoss``, ``weight`` has one value per class (CE uses all; Dice drops the first without background).

    Examples:
        >>> import torch
        >>> from monai.losses import DiceCELoss
        >>> from monai_gdl_plus import DiceCEPlusLoss
        >>> loss = DiceCEPlusLoss(to_onehot_y=True, softmax=True)  # was monai.losses.DiceCELoss(...)
        >>> (loss.lambda_dice, loss.lambda_ce)
        (1.0, 1.0)
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
        >>> torch.allclose(loss(x, y), DiceCELoss(to_onehot_y=True, softmax=True)(x, y))
        True
    """

    positional = (*_DICE_ORDER, "squared_pred", "jaccard", "reduction", "smooth_nr", "smooth_dr", "batch", "weight",
                  "lambda_dice", "lambda_ce", "label_smoothing")  # fmt: skip
    defaults = {"lambda_ce": 1.0}


class TverskyPlusLoss(DicePlusLoss):
    """Tversky loss (Salehi et al. 2017), a drop-in for ``monai.losses.TverskyLoss``: ``DicePlusLoss`` with
    ``tversky=(alpha, beta)``.

    Per sample and class ``1 - (I + smooth_nr) / (I + alpha FP + beta FN + smooth_dr)`` with ``I = sum(p g)``,
    ``FP = sum(p) - I`` (false positives) and ``FN = sum(g) - I`` (false negatives); ``alpha = beta = 0.5`` is Dice.
    Every :class:`DicePlusLoss` extension but ``jaccard`` and ``squared_pred`` is a keyword argument (``weight``,
    ``lambda_ce``, ...). ``reduction="none"`` returns (B, C') as MONAI's does.

    Examples:
        >>> import torch
        >>> from monai.losses import TverskyLoss
        >>> from monai_gdl_plus import TverskyPlusLoss
        >>> loss = TverskyPlusLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)
        >>> loss.tversky
        (0.3, 0.7)
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
        >>> torch.allclose(loss(x, y), TverskyLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)(x, y))
        True
    """

    positional = (*_DICE_ORDER, "alpha", "beta", "reduction", "smooth_nr", "smooth_dr", "batch", "soft_label",
                  "ignore_index")  # fmt: skip
    defaults = {"alpha": 0.5, "beta": 0.5}
    hidden = ("tversky", "jaccard", "squared_pred")

    @classmethod
    def _to_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        values["tversky"] = (values.pop("alpha"), values.pop("beta"))
        return values


class DiceFocalPlusLoss(DicePlusLoss):
    """``DicePlusLoss`` with ``monai.losses.DiceFocalLoss``'s arguments, order and defaults: ``lambda_dice * Dice +
    lambda_focal * Focal`` (``lambda_focal=1``, ``gamma=2``; ``alpha`` is the focal alpha-balance).

    As in MONAI, the focal term takes the sigmoid form whatever ``softmax`` says (``focal_softmax=True`` gives the
    softmax form), and ``weight`` weighs both terms, one value per kept class. Every :class:`DicePlusLoss`
    extension is a keyword argument (``ignore_index`` applies to the focal term too).

    Examples:
        >>> import torch
        >>> from monai.losses import DiceFocalLoss
        >>> from monai_gdl_plus import DiceFocalPlusLoss
        >>> loss = DiceFocalPlusLoss(to_onehot_y=True, softmax=True, gamma=1.5)  # was monai.losses.DiceFocalLoss
        >>> (loss.lambda_focal, loss.gamma, loss.focal_alpha)
        (1.0, 1.5, None)
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
        >>> torch.allclose(loss(x, y), DiceFocalLoss(to_onehot_y=True, softmax=True, gamma=1.5)(x, y))
        True
    """

    positional = (*_DICE_ORDER, "squared_pred", "jaccard", "reduction", "smooth_nr", "smooth_dr", "batch", "gamma",
                  "weight", "lambda_dice", "lambda_focal", "alpha")  # fmt: skip
    defaults = {"lambda_focal": 1.0, "alpha": None}
    hidden = ("focal_alpha",)

    @classmethod
    def _to_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        values["focal_alpha"] = values.pop("alpha")
        return values


class MaskedDicePlusLoss(DicePlusLoss):
    """Dice loss over a region, a drop-in for ``monai.losses.MaskedDiceLoss``: :class:`DicePlusLoss` whose
    ``forward`` takes a binary ``mask`` ``(B, 1, *spatial)`` or ``(1, 1, *spatial)``; voxels where it is 0 leave
    every sum (prediction, target, CE and focal terms), after the activation, exactly as ``ignore_index`` leaves
    voxels out. ``mask=None`` is :class:`DicePlusLoss`. A label map stays one-hot-free (the mask joins the ignore
    mask).

    Equals MONAI's value and gradient for one-hot targets and for label maps without background. **Departure:** with
    a label map, ``to_onehot_y=True`` and background included, MONAI multiplies the label map by the mask, so masked
    voxels become class-0 targets with zero prediction and inflate the background's volume; here they are left out,
    which is what MONAI computes for the same target given as one-hot.

    Examples:
        >>> import torch
        >>> from monai.losses import MaskedDiceLoss
        >>> from monai_gdl_plus import MaskedDicePlusLoss
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
        >>> mask = (torch.rand(2, 1, 8, 8, 8, generator=gen) > 0.3).float()
        >>> ours = MaskedDicePlusLoss(to_onehot_y=True, softmax=True, include_background=False)
        >>> theirs = MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False)
        >>> torch.allclose(ours(x, y, mask), theirs(x, y, mask))
        True
    """

    positional = (*_DICE_ORDER, "squared_pred", "jaccard", "reduction", "smooth_nr", "smooth_dr", "batch", "weight",
                  "soft_label")  # fmt: skip

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of ``input`` against ``target`` over the voxels where ``mask`` is 1 (all of them for None)."""
        return GF.dice_plus_loss(input, target, self.options, weight=self.class_weight, mask=mask)


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

    Positional arguments in ``GeneralizedDiceLoss``'s order; every argument is also an attribute.

    Args:
        include_background, to_onehot_y, sigmoid, softmax, other_act: as in ``monai.losses.GeneralizedDiceLoss``.
        reduction, smooth_nr, smooth_dr, batch, soft_label: as in ``monai.losses.GeneralizedDiceLoss``.
        w_type: ``"square"`` (default), ``"simple"`` or ``"uniform"``.
        squared_pred: squared denominator ``sum(p**2) + sum(g**2)`` (weights still use ``V = sum(g)``).
        jaccard: generalised soft IoU instead of Dice.
        tversky: ``(alpha, beta)``: generalised Tversky, the class weights applied to ``I``, ``FP`` and ``FN``:
            ``1 - (sum_c w_c I_c + nr) / (sum_c w_c (I_c + alpha FP_c + beta FN_c) + dr)``.
        weight: static class weights multiplying the volume weights (same length rules as :class:`DicePlusLoss`),
            and CE/BCE class weights.
        ignore_index: as in :class:`DicePlusLoss`.
        absent_weight: ``"max"``, ``"zero"`` or a float >= 0.
        normalize_weights: divide the weights by their sum per sample (per batch with ``batch=True``).
        lambda_dice, lambda_ce, label_smoothing: as in :class:`DicePlusLoss`.
        lambda_focal, gamma, focal_alpha, focal_softmax: as in :class:`DicePlusLoss`.
        sync_batch, validate: as in :class:`DicePlusLoss` (with ``sync_batch`` the GDL weights come from the global
            volumes).

    Shapes:
        input ``(B, C, *S)``; target ``(B, C, *S)`` or ``(B, 1, *S)`` labels with ``to_onehot_y``.
        Output: scalar; with ``reduction="none"`` (B,), or 0-d with ``batch=True``.

    Examples:
        With ``normalize_weights=False`` the value is MONAI's ``GeneralizedDiceLoss``'s; the default normalised
        weights change it a little here (more on large volumes, where ``1/V**2`` is tiny beside the smoothing):

        >>> import torch
        >>> from monai.losses import GeneralizedDiceLoss
        >>> from monai_gdl_plus import GeneralizedDicePlusLoss
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)  # logits (B, C, D, H, W)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)  # labels (B, 1, D, H, W)
        >>> monai_gdl = GeneralizedDiceLoss(to_onehot_y=True, softmax=True)
        >>> ours = GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, normalize_weights=False)
        >>> torch.allclose(ours(x, y), monai_gdl(x, y))
        True
        >>> GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, reduction="none")(x, y).shape  # per sample
        torch.Size([2])

        The empty-sample rule: no foreground in the target, one voxel confidently predicted foreground. MONAI
        scores 0 (nothing to learn); this loss scores ``S / (S + 1) = 0.5``:

        >>> g = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # (B=1, C=2, N=2): background only
        >>> p = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # the first voxel predicted foreground
        >>> GeneralizedDicePlusLoss(include_background=False)(p, g)
        tensor(0.5000)
        >>> GeneralizedDiceLoss(include_background=False)(p, g)
        tensor(0.)
    """

    options_class = GeneralizedDiceOptions
    function = staticmethod(GF.generalized_dice_plus_loss)
    positional: ClassVar[tuple[str, ...]] = (
        *_DICE_ORDER, "w_type", "reduction", "smooth_nr", "smooth_dr", "batch", "soft_label",
    )  # fmt: skip
    options: GeneralizedDiceOptions


class GeneralizedDiceFocalPlusLoss(GeneralizedDicePlusLoss):
    """``GeneralizedDicePlusLoss`` with ``monai.losses.GeneralizedDiceFocalLoss``'s arguments, order and defaults:
    ``lambda_gdl * GDL + lambda_focal * Focal`` (``lambda_focal=1``, ``gamma=2``, sigmoid-form focal term).

    As in MONAI, ``weight`` weighs the focal term only (the GDL weights stay volume-based; use
    :class:`GeneralizedDicePlusLoss` with ``lambda_focal`` for static weights on both). Every
    :class:`GeneralizedDicePlusLoss` extension is a keyword argument.

    Examples:
        >>> import torch
        >>> from monai.losses import GeneralizedDiceFocalLoss
        >>> from monai_gdl_plus import GeneralizedDiceFocalPlusLoss
        >>> loss = GeneralizedDiceFocalPlusLoss(to_onehot_y=True, softmax=True, lambda_gdl=0.5)
        >>> (loss.lambda_dice, loss.lambda_focal)
        (0.5, 1.0)
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
        >>> monai_loss = GeneralizedDiceFocalLoss(to_onehot_y=True, softmax=True, lambda_gdl=0.5)
        >>> torch.allclose(GeneralizedDiceFocalPlusLoss(to_onehot_y=True, softmax=True, lambda_gdl=0.5,
        ...                                             normalize_weights=False)(x, y), monai_loss(x, y))
        True
    """

    positional = (*_DICE_ORDER, "w_type", "reduction", "smooth_nr", "smooth_dr", "batch", "gamma", "weight",
                  "lambda_gdl", "lambda_focal")  # fmt: skip
    defaults = {"lambda_focal": 1.0, "lambda_gdl": 1.0}
    hidden = ("lambda_dice",)

    @classmethod
    def _to_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        values["lambda_dice"] = values.pop("lambda_gdl")
        return values

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``input`` (logits) against ``target``; ``weight`` goes to the focal term alone (MONAI's rule)."""
        return GF.generalized_dice_plus_loss(input, target, self.options, focal_weight=self.class_weight)


class GeneralizedWassersteinDicePlusLoss(_OptionsLoss):
    """Generalised Wasserstein Dice loss (Fidon et al. 2017), a drop-in for
    ``monai.losses.GeneralizedWassersteinDiceLoss``: the class-aware Dice of a softmax against a label map, where a
    wrong class costs its distance to the true class.

    Per voxel the Wasserstein distance ``w_n = sum_c M[y_n, c] p_{c,n}`` between the softmax ``p`` and the true
    class ``y_n`` under the class distances ``M`` (divided by their maximum); with class weights ``a_k``,
    ``TP = sum_n a_{y_n} (1 - w_n)`` and the loss ``1 - (2 TP + smooth_nr) / (D + smooth_dr)`` per sample, where
    ``"default"``: ``a_0 = 0``, ``a_k = 1`` otherwise, ``D = 2 TP + sum_n w_n``; ``"GDL"`` (Tilborghs et al. 2020):
    ``a_k = 1 / (V_k + 1)`` from the class volumes ``V_k``, ``D = sum_n a_{y_n} (2 - w_n)``. Computed from per-class
    sums (``functional.wasserstein_terms``), without a one-hot or MONAI's (B, C, N) map of gathered distances.

    With MONAI's arguments the value and gradient equal MONAI's (1.6 on; before 1.6 MONAI's loss mixes the samples
    of a batch, its class weights broadcasting against every sample's distances, and cannot shape
    ``reduction="none"``: one sample at a time the values agree). Positional arguments in MONAI's order; the
    extensions are keyword-only; every option is also an attribute (``loss.weighting_mode``).

    Args:
        dist_matrix: C x C distances between the classes (tensor, numpy array or nested sequence), divided by its
            maximum as MONAI does; stored as the buffer ``dist_matrix``, so ``.to(device)`` moves it. Non-negative,
            finite, with a positive maximum.
        weighting_mode: ``"default"`` (Fidon et al.) or ``"GDL"`` (inverse-volume weights, Tilborghs et al.).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        batch: sum the per-class terms over the batch before the ratio (``"GDL"`` weights from the batch volumes).
        ignore_index: label value whose voxels are left out of every sum (255, -1, or a class index: its voxels are
            left out, its channel stays in the softmax and in the other voxels' distances).
        sync_batch: with ``batch=True``, add up the batch terms of every process of the default
            ``torch.distributed`` group, with gradient, as :class:`DicePlusLoss` does.
        validate: run every value check even on an accelerator (synchronising), and scan ``input`` for NaN/Inf.

    Shapes:
        input ``(B, C, *S)`` logits (the softmax is applied inside, as MONAI does); target ``(B, *S)`` or
        ``(B, 1, *S)`` labels in [0, C) (or ``ignore_index``). Output: scalar; with ``reduction="none"`` (B,), or
        0-d with ``batch=True``.

    Raises:
        ValueError: at construction for a non-square ``dist_matrix`` or a bad option (naming the argument, with "did
            you mean" for ``weighting_mode``); in ``forward`` for a ``dist_matrix`` that is not C x C, bad shapes and
            labels outside [0, C).
        TypeError: at construction for an argument of the wrong type or an unknown argument.

    Examples:
        >>> import numpy as np
        >>> import torch
        >>> from monai.losses import GeneralizedWassersteinDiceLoss
        >>> from monai_gdl_plus import GeneralizedWassersteinDicePlusLoss
        >>> m = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.5], [1.0, 0.5, 0.0]], dtype=np.float32)
        >>> GeneralizedWassersteinDicePlusLoss(m)(torch.eye(3) * 1000, torch.tensor([0, 1, 2]))  # MONAI's example
        tensor(0.)
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 8, 8, 8, generator=gen)  # logits (B, C, D, H, W)
        >>> y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)  # labels (B, 1, D, H, W)
        >>> for mode in ("default", "GDL"):
        ...     ours = GeneralizedWassersteinDicePlusLoss(m, weighting_mode=mode, reduction="none")(x, y)
        ...     print(mode, ours.shape, torch.allclose(ours, GeneralizedWassersteinDiceLoss(m, mode, "none")(x, y)))
        default torch.Size([2]) True
        GDL torch.Size([2]) True
    """

    __signature__: ClassVar[inspect.Signature] = inspect.Signature(
        [_P("dist_matrix", _P.POSITIONAL_OR_KEYWORD)]
        + [p.replace(annotation=_P.empty) for p in inspect.signature(WassersteinDiceOptions).parameters.values()]
    )
    options: WassersteinDiceOptions
    dist_matrix: torch.Tensor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {e} (arguments: {self.__signature__}).") from None
        values = dict(bound.arguments)
        m = GF.check_dist_matrix(values.pop("dist_matrix")).detach().clone()
        options = WassersteinDiceOptions(**values)
        super().__init__(reduction=options.reduction)
        self.options = options
        self.register_buffer("dist_matrix", m)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``input`` (logits) against the label map ``target``; see the class docstring for shapes."""
        return GF.generalized_wasserstein_dice_plus_loss(input, target, self.dist_matrix, self.options)

    def extra_repr(self) -> str:
        shown = self.options.shown()
        size = "x".join(str(s) for s in self.dist_matrix.shape)
        return f"dist_matrix=<{size}>" + (f", {shown}" if shown else "")
