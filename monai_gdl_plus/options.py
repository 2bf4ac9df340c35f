"""The options of the Dice-family losses: one frozen, typed, validated object per base loss.

:class:`DiceOptions` holds every argument of :class:`~monai_gdl_plus.DicePlusLoss` but the static class ``weight``
(a tensor: a buffer of the module); :class:`GeneralizedDiceOptions` adds the Generalised Dice ones;
:class:`WassersteinDiceOptions` holds those of :class:`~monai_gdl_plus.GeneralizedWassersteinDicePlusLoss` but its
``dist_matrix`` (a buffer too). Each is checked once, at construction, and shared by the modules
(:mod:`monai_gdl_plus.losses`) and the functions (:mod:`monai_gdl_plus.functional`), so an argument is declared,
defaulted and validated in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ABSENT_WEIGHTS",
    "REDUCTIONS",
    "WEIGHTING_MODES",
    "W_TYPES",
    "AbsentWeight",
    "DiceOptions",
    "GeneralizedDiceOptions",
    "Reduction",
    "WType",
    "WassersteinDiceOptions",
    "WeightingMode",
    "check_option",
]

REDUCTIONS = ("none", "mean", "sum")
W_TYPES = ("square", "simple", "uniform")
ABSENT_WEIGHTS = ("max", "zero")

Reduction = Literal["none", "mean", "sum"]
WType = Literal["square", "simple", "uniform"]
AbsentWeight = Literal["max", "zero"] | float


def check_option(name: str, value: object, options: Sequence[str]) -> str:
    """Return ``value`` as one of ``options`` or raise a ValueError naming the argument (with "did you mean")."""
    # imported here, not at the top: ``import monai`` loads all of MONAI's submodules, matplotlib and TensorBoard
    # among them (about 3 s); ``import monai_gdl_plus`` stays free of that until a loss is built
    from monai.utils import look_up_option

    try:
        return str(look_up_option(value, options))
    except ValueError as e:
        raise ValueError(f"`{name}` must be one of {tuple(options)}, got {value!r}. {e}") from None


def _number(name: str, value: object, low: float = 0.0, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high) or value == float("inf"):  # type: ignore[operator]
        bound = f"in [{low}, {high}]" if high is not None else f"a finite number no less than {low}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DiceOptions:
    """Every option of :class:`~monai_gdl_plus.DicePlusLoss` except ``weight``; see there for their meaning.

    Raises:
        ValueError: at construction for a bad value, naming the argument, the expectation and the value received.
        TypeError: at construction for a value of the wrong type, likewise.

    Examples:
        Checked once, at construction (an option string gets a "did you mean"):

        >>> from monai_gdl_plus.options import DiceOptions
        >>> DiceOptions(reduction="meen")
        Traceback (most recent call last):
        ...
        ValueError: `reduction` must be one of ('none', 'mean', 'sum'), got 'meen'. By 'meen', did you mean 'mean'?...

        Frozen, and shared: one object configures the functions of :mod:`monai_gdl_plus.functional` as the module
        does.

        >>> import dataclasses, torch
        >>> from monai_gdl_plus import DicePlusLoss, functional
        >>> options = DiceOptions(include_background=False, reduction="none")
        >>> options.reduction = "sum"
        Traceback (most recent call last):
        ...
        dataclasses.FrozenInstanceError: cannot assign to field 'reduction'
        >>> dataclasses.replace(options, reduction="sum").reduction
        'sum'
        >>> p = torch.tensor([[[0.3, 1.0], [0.7, 0.0]]])  # (B=1, C=2, N=2) probabilities
        >>> g = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
        >>> functional.dice_plus_loss(p, g, options)  # class 1 only: 1 - 1.4 / 2.7
        tensor([[0.4815]])
        >>> torch.equal(functional.dice_plus_loss(p, g, options), DicePlusLoss(include_background=False,
        ...                                                                   reduction="none")(p, g))
        True
    """

    include_background: bool = True
    to_onehot_y: bool = False
    sigmoid: bool = False
    softmax: bool = False
    other_act: Callable | None = None
    squared_pred: bool = False
    jaccard: bool = False
    reduction: Reduction = "mean"
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    batch: bool = False
    soft_label: bool = False
    ignore_index: int | None = None
    lambda_dice: float = 1.0
    lambda_ce: float = 0.0
    label_smoothing: float = 0.0
    tversky: tuple[float, float] | None = None
    lambda_focal: float = 0.0
    gamma: float = 2.0
    focal_alpha: float | None = None
    focal_softmax: bool = False
    sync_batch: bool = False
    validate: bool = False

    def __post_init__(self) -> None:
        self._check_values()
        self._check_combinations()

    def _put(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: the checked, normalised value replaces the given one

    def _check_values(self) -> None:
        """Each option on its own: its type, its range, its normalised form."""
        if self.other_act is not None and not callable(self.other_act):
            raise TypeError(f"`other_act` must be None or callable, got {type(self.other_act).__name__}.")
        for f in dataclasses.fields(self):
            if f.type == "bool":
                self._put(f.name, bool(getattr(self, f.name)))
        self._put("reduction", check_option("reduction", self.reduction, REDUCTIONS))
        for name in ("smooth_nr", "smooth_dr", "lambda_dice", "lambda_ce", "lambda_focal", "gamma"):
            self._put(name, _number(name, getattr(self, name)))
        self._put("label_smoothing", _number("label_smoothing", self.label_smoothing, 0.0, 1.0))
        ii = self.ignore_index
        if ii is not None and (isinstance(ii, bool) or not isinstance(ii, int)):
            raise TypeError(f"`ignore_index` must be an int or None, got {ii!r}.")
        if self.tversky is not None:
            if not isinstance(self.tversky, Sequence) or isinstance(self.tversky, str) or len(self.tversky) != 2:
                raise TypeError(f"`tversky` must be None or a pair (alpha, beta), got {self.tversky!r}.")
            alpha, beta = self.tversky
            self._put("tversky", (_number("tversky[0] (alpha)", alpha), _number("tversky[1] (beta)", beta)))
        if self.focal_alpha is not None:
            self._put("focal_alpha", _number("focal_alpha", self.focal_alpha, 0.0, 1.0))

    def _check_combinations(self) -> None:
        """Options that exclude or need one another."""
        if int(self.sigmoid) + int(self.softmax) + int(self.other_act is not None) > 1:
            raise ValueError(
                "`sigmoid`, `softmax` and `other_act` are mutually exclusive: got "
                f"sigmoid={self.sigmoid}, softmax={self.softmax}, other_act={self.other_act!r}."
            )
        if self.tversky is not None and (self.jaccard or self.squared_pred):
            raise ValueError(
                "`tversky` replaces the Dice ratio and needs the linear sums: it cannot be combined with "
                f"jaccard={self.jaccard} or squared_pred={self.squared_pred}."
            )
        if self.sync_batch and not self.batch:
            raise ValueError(
                "`sync_batch=True` sums the batch terms over every process and needs `batch=True`, got batch=False."
            )
        for name in ("lambda_ce", "lambda_focal"):
            if getattr(self, name) > 0 and self.reduction == "none":
                raise ValueError(
                    f"`reduction='none'` cannot be combined with `{name}` > 0: that term is not a per-class value of "
                    f"the Dice term's shape (got {name}={getattr(self, name)}). Use reduction='mean' or 'sum', or "
                    f"{name}=0."
                )

    def shown(self) -> str:
        """``name=value`` for every option that differs from its default (for ``repr``)."""
        changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in changed)


@dataclass(frozen=True)
class GeneralizedDiceOptions(DiceOptions):
    """:class:`DiceOptions` plus the Generalised Dice options of :class:`~monai_gdl_plus.GeneralizedDicePlusLoss`.

    Examples:
        >>> from monai_gdl_plus.options import GeneralizedDiceOptions
        >>> GeneralizedDiceOptions(w_type="simple", absent_weight=0).absent_weight
        0.0
        >>> GeneralizedDiceOptions(w_type="squared")
        Traceback (most recent call last):
        ...
        ValueError: `w_type` must be one of ('square', 'simple', 'uniform'), got 'squared'. ...
    """

    w_type: WType = "square"
    absent_weight: AbsentWeight = "max"
    normalize_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._put("w_type", check_option("w_type", self.w_type, W_TYPES))
        aw = self.absent_weight
        if isinstance(aw, bool):
            raise TypeError(f"`absent_weight` must be 'max', 'zero' or a float, got {aw!r}.")
        if isinstance(aw, (int, float)):
            if not aw >= 0 or aw == float("inf"):
                raise ValueError(f"`absent_weight` as a number must be finite and >= 0, got {aw!r}.")
            self._put("absent_weight", float(aw))
        else:
            self._put("absent_weight", check_option("absent_weight", aw, ABSENT_WEIGHTS))


WEIGHTING_MODES = ("default", "GDL")
WeightingMode = Literal["default", "GDL"]


@dataclass(frozen=True)
class WassersteinDiceOptions:
    """Every option of :class:`~monai_gdl_plus.GeneralizedWassersteinDicePlusLoss` except ``dist_matrix`` (a tensor:
    a buffer of the module); see there for their meaning.

    Raises:
        ValueError: at construction for a bad value, naming the argument, the expectation and the value received.
        TypeError: at construction for a value of the wrong type, likewise.

    Examples:
        >>> from monai_gdl_plus.options import WassersteinDiceOptions
        >>> WassersteinDiceOptions(weighting_mode="GDL", batch=True).shown()
        "weighting_mode='GDL', batch=True"
        >>> WassersteinDiceOptions(weighting_mode="gdl")
        Traceback (most recent call last):
        ...
        ValueError: `weighting_mode` must be one of ('default', 'GDL'), got 'gdl'. By 'gdl', did you mean 'GDL'?...
    """

    weighting_mode: WeightingMode = "default"
    reduction: Reduction = "mean"
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    _: dataclasses.KW_ONLY  # MONAI's arguments above, in its order; the extensions below are keyword-only
    batch: bool = False
    ignore_index: int | None = None
    sync_batch: bool = False
    validate: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in ("batch", "sync_batch", "validate"):
            put(name, bool(getattr(self, name)))
        put("weighting_mode", check_option("weighting_mode", self.weighting_mode, WEIGHTING_MODES))
        put("reduction", check_option("reduction", self.reduction, REDUCTIONS))
        for name in ("smooth_nr", "smooth_dr"):
            put(name, _number(name, getattr(self, name)))
        ii = self.ignore_index
        if ii is not None and (isinstance(ii, bool) or not isinstance(ii, int)):
            raise TypeError(f"`ignore_index` must be an int or None, got {ii!r}.")
        if self.sync_batch and not self.batch:
            raise ValueError(
                "`sync_batch=True` sums the batch terms over every process and needs `batch=True`, got batch=False."
            )

    def shown(self) -> str:
        """``name=value`` for every option that differs from its default (for ``repr``)."""
        changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in changed)
