"""Tests of :mod:`monai_gdl_plus.options`: one validated, frozen options object per base loss; its argument errors
through the loss constructors too (every message with ``match=``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from monai_gdl_plus import (
    DiceCEPlusLoss,
    DiceFocalPlusLoss,
    DicePlusLoss,
    GeneralizedDiceFocalPlusLoss,
    GeneralizedDicePlusLoss,
    GeneralizedWassersteinDicePlusLoss,
    TverskyPlusLoss,
)
from monai_gdl_plus import functional as GF
from monai_gdl_plus.options import DiceOptions, GeneralizedDiceOptions, WassersteinDiceOptions


def test_defaults_are_monai_s_and_values_are_normalised():
    o = GeneralizedDiceOptions(reduction="sum", w_type="simple", absent_weight=1, sigmoid=1, smooth_nr=0)
    assert (o.reduction, o.w_type, o.absent_weight, o.sigmoid, o.smooth_nr) == ("sum", "simple", 1.0, True, 0.0)
    assert isinstance(o.absent_weight, float) and isinstance(o.smooth_nr, float)
    d = DiceOptions()
    assert (d.include_background, d.reduction, d.smooth_nr, d.lambda_dice, d.lambda_ce, d.tversky) == (
        True, "mean", 1e-5, 1.0, 0.0, None,
    )  # fmt: skip


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DiceOptions().lambda_ce = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"reduction": "meen"}, ValueError, r"`reduction` must be one of \('none', 'mean', 'sum'\), got 'meen'"),
        ({"smooth_nr": -1e-5}, ValueError, r"`smooth_nr` must be a finite number no less than 0.0, got -1e-05"),
        ({"lambda_ce": float("inf")}, ValueError, r"`lambda_ce` must be .*got inf"),
        ({"lambda_dice": True}, ValueError, r"`lambda_dice` must be .*got True"),
        ({"label_smoothing": 1.5}, ValueError, r"`label_smoothing` must be in \[0.0, 1.0\], got 1.5"),
        ({"ignore_index": 2.0}, TypeError, r"`ignore_index` must be an int or None, got 2.0"),
        ({"other_act": "tanh"}, TypeError, r"`other_act` must be None or callable, got str"),
        ({"sigmoid": True, "other_act": torch.tanh}, ValueError, "mutually exclusive"),
        ({"tversky": "ab"}, TypeError, r"`tversky` must be None or a pair"),
        ({"tversky": (0.5, -1)}, ValueError, r"`tversky\[1\] \(beta\)` must be"),
        ({"lambda_ce": 1.0, "reduction": "none"}, ValueError, r"reduction='none'.*lambda_ce=1.0"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        DiceOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"w_type": "sqare"}, ValueError, r"`w_type`.*did you mean 'square'"),
        ({"absent_weight": "mx"}, ValueError, r"`absent_weight`.*did you mean 'max'"),
        ({"absent_weight": -1.0}, ValueError, r"`absent_weight` as a number must be finite and >= 0, got -1.0"),
        ({"absent_weight": False}, TypeError, r"`absent_weight` must be 'max', 'zero' or a float, got False"),
    ],
)
def test_invalid_generalized_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        GeneralizedDiceOptions(**kwargs)


def test_shown_lists_what_differs_from_the_defaults():
    assert DiceOptions().shown() == ""
    assert DiceOptions(softmax=True, lambda_ce=0.5).shown() == "softmax=True, lambda_ce=0.5"


def test_module_and_function_share_one_options_object():
    """The module keeps the object it built; the function takes that object or the same fields as keywords, not
    both; the value is the same every way."""
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (2, 1, 5, 5), generator=torch.Generator().manual_seed(1))
    loss = GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, w_type="simple", weight=[0.5, 1.0, 2.0])
    assert loss.options == GeneralizedDiceOptions(to_onehot_y=True, softmax=True, w_type="simple")
    by_object = GF.generalized_dice_plus_loss(x, y, loss.options, weight=[0.5, 1.0, 2.0])
    by_keywords = GF.generalized_dice_plus_loss(x, y, to_onehot_y=True, softmax=True, w_type="simple",
                                                weight=[0.5, 1.0, 2.0])  # fmt: skip
    unweighted = GF.generalized_dice_plus_loss(x, y, loss.options)
    assert torch.equal(loss(x, y), by_object) and torch.equal(by_object, by_keywords)
    assert not torch.equal(by_object, unweighted)
    with pytest.raises(TypeError, match=r"either `options` or option keywords, not both.*\['softmax'\]"):
        GF.generalized_dice_plus_loss(x, y, loss.options, softmax=True)
    with pytest.raises(TypeError, match="`options` must be a GeneralizedDiceOptions, got DiceOptions"):
        GF.generalized_dice_plus_loss(x, y, DiceOptions())
    with pytest.raises(ValueError, match=r"`weight`.*no less than 0"):
        GF.dice_plus_loss(x, y, DicePlusLoss(to_onehot_y=True).options, weight=torch.tensor([1.0, -1.0, 1.0]))


# --------------------------------------------------------------------------------------------------------------------
# the same checks through the loss constructors
# --------------------------------------------------------------------------------------------------------------------

BOTH = pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])


@pytest.mark.parametrize(
    "cls,kwargs,error,match",
    [
        (DicePlusLoss, {"tversky": (0.5, 0.5), "jaccard": True}, ValueError, r"`tversky`.*jaccard=True"),
        (GeneralizedDicePlusLoss, {"tversky": (0.5, 0.5), "squared_pred": True}, ValueError, "squared_pred=True"),
        (DicePlusLoss, {"tversky": (0.5,)}, TypeError, r"`tversky` must be None or a pair \(alpha, beta\)"),
        (TverskyPlusLoss, {"alpha": -0.1}, ValueError, r"`tversky\[0\] \(alpha\)` must be .*-0.1"),
        (TverskyPlusLoss, {"jaccard": True}, TypeError, r"TverskyPlusLoss: .*'jaccard'"),
        (DiceCEPlusLoss, {"lambda_gdl": 1.0}, TypeError, r"DiceCEPlusLoss: .*'lambda_gdl'"),
        (DiceFocalPlusLoss, {"alpha": 1.5}, ValueError, r"`focal_alpha` must be in \[0.0, 1.0\], got 1.5"),
        (DiceFocalPlusLoss, {"focal_alpha": 0.5}, TypeError, r"DiceFocalPlusLoss: .*'focal_alpha'"),
        (GeneralizedDiceFocalPlusLoss, {"reduction": "none"}, ValueError, r"reduction='none'.*lambda_focal"),
        (GeneralizedDiceFocalPlusLoss, {"gamma": -1}, ValueError, r"`gamma` must be a finite number"),
    ],
)
def test_family_constructor_errors(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "loss_cls,kwargs,match",
    [
        (DicePlusLoss, {"reduction": "meen"}, r"`reduction`.*did you mean 'mean'"),
        (GeneralizedDicePlusLoss, {"reduction": "sun"}, r"`reduction`.*did you mean 'sum'"),
        (GeneralizedDicePlusLoss, {"w_type": "sqare"}, r"`w_type`.*did you mean 'square'"),
        (GeneralizedDicePlusLoss, {"absent_weight": "maxx"}, r"`absent_weight`.*did you mean 'max'"),
    ],
)
def test_unknown_option_strings_suggest(loss_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loss_cls(**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sigmoid": True, "softmax": True}, ValueError, "mutually exclusive"),
        ({"softmax": True, "other_act": torch.tanh}, ValueError, "mutually exclusive"),
        ({"other_act": "tanh"}, TypeError, "`other_act` must be None or callable"),
        ({"reduction": "none", "lambda_ce": 0.5}, ValueError, r"reduction='none'.*lambda_ce"),
        ({"weight": [1.0, -0.5, 1.0]}, ValueError, r"`weight`.*no less than 0"),
        ({"weight": [1.0, float("nan")]}, ValueError, r"`weight`.*finite"),
        ({"lambda_ce": -1.0}, ValueError, "`lambda_ce`"),
        ({"lambda_dice": -1.0}, ValueError, "`lambda_dice`"),
        ({"smooth_dr": -1.0}, ValueError, "`smooth_dr`"),
        ({"label_smoothing": 1.5}, ValueError, "`label_smoothing`"),
        ({"ignore_index": 2.5}, TypeError, "`ignore_index`"),
    ],
)
@BOTH
def test_constructor_errors_are_raised_at_construction(loss_cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        loss_cls(**kwargs)


@pytest.mark.parametrize("value,error", [(-0.5, ValueError), (float("inf"), ValueError), (True, TypeError)])
def test_absent_weight_bad_values(value, error):
    with pytest.raises(error, match="`absent_weight`"):
        GeneralizedDicePlusLoss(absent_weight=value)


# --------------------------------------------------------------------------------------------------------------------
# WassersteinDiceOptions (GeneralizedWassersteinDicePlusLoss)
# --------------------------------------------------------------------------------------------------------------------


def test_wasserstein_options_defaults_are_monai_s_and_extensions_keyword_only():
    o = WassersteinDiceOptions("GDL", "sum", 0, 1e-3, batch=1)
    assert (o.weighting_mode, o.reduction, o.smooth_nr, o.smooth_dr, o.batch) == ("GDL", "sum", 0.0, 1e-3, True)
    assert isinstance(o.smooth_nr, float) and o.batch is True
    d = WassersteinDiceOptions()
    assert (d.weighting_mode, d.reduction, d.smooth_nr, d.smooth_dr, d.ignore_index) == ("default", "mean", 1e-5,
                                                                                         1e-5, None)  # fmt: skip
    with pytest.raises(TypeError):
        WassersteinDiceOptions("GDL", "sum", 0, 1e-3, True)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.batch = True  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"weighting_mode": "gdl"}, ValueError,
         r"`weighting_mode` must be one of \('default', 'GDL'\), got 'gdl'. By 'gdl', did you mean 'GDL'"),
        ({"weighting_mode": "defualt"}, ValueError, r"`weighting_mode`.*did you mean 'default'"),
        ({"reduction": "meen"}, ValueError, r"`reduction` must be one of \('none', 'mean', 'sum'\), got 'meen'"),
        ({"smooth_nr": -1.0}, ValueError, r"`smooth_nr` must be a finite number no less than 0.0, got -1.0"),
        ({"smooth_dr": float("inf")}, ValueError, r"`smooth_dr` must be .*got inf"),
        ({"ignore_index": True}, TypeError, r"`ignore_index` must be an int or None, got True"),
        ({"sync_batch": True}, ValueError, r"`sync_batch=True` .* needs `batch=True`, got batch=False"),
    ],
)  # fmt: skip
def test_invalid_wasserstein_options_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        WassersteinDiceOptions(**kwargs)
    with pytest.raises(error, match=match):  # through the module, at construction
        GeneralizedWassersteinDicePlusLoss([[0.0, 1.0], [1.0, 0.0]], **kwargs)
