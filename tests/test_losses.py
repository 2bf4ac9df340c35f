"""Tests of :mod:`monai_gdl_plus.losses`.

Two references: the installed MONAI classes where behaviour must match (value and gradient to 1e-5), and the slow
formula-by-formula code in ``tests/reference.py`` for the extensions. Run with ``-s`` to see the parity summary.
The maths the classes share lives with its module: the CE/focal/ignore_index/autocast terms in ``test_functional.py``,
the fused route in ``test__fused.py``, the argument errors in ``test_options.py``, the value checks in ``test__ops.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import subprocess
import sys
import warnings

import monai
import monai.losses as ML
import pytest
import reference as R
import torch
from cases import (
    SHAPES,
    _assert_matches_reference,
    _class_weight,
    _make_case,
    _target,
    _value_and_grad,
    _weight_for,
    _with_ignored,
    forbid_host_syncs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from monai_gdl_plus import (
    DiceCEPlusLoss,
    DiceFocalPlusLoss,
    DicePlusLoss,
    GeneralizedDiceFocalPlusLoss,
    GeneralizedDicePlusLoss,
    GeneralizedWassersteinDicePlusLoss,
    MaskedDicePlusLoss,
    TverskyPlusLoss,
    _ops,
)

ACTS = {"sigmoid": {"sigmoid": True}, "softmax": {"softmax": True}}
REDUCTIONS = ("mean", "sum", "none")
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


class _NotInThisMonai:
    """Stands in for a MONAI loss built with an argument this MONAI release lacks: calling it skips the test."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, *args, **kwargs):
        pytest.skip(self.reason)


def _monai(cls, **kw):
    """MONAI's ``cls(**kw)``, on any supported MONAI: an argument this release lacks (``soft_label`` before 1.5,
    ``ignore_index`` before 1.6) is dropped at its default (None or False), otherwise the test is skipped."""
    params = inspect.signature(cls.__init__).parameters
    for name in [k for k in kw if k not in params and kw[k] in (None, False)]:
        del kw[name]
    lacking = sorted(k for k in kw if k not in params)
    if lacking:
        return _NotInThisMonai(f"MONAI {monai.__version__}'s {cls.__name__} has no {', '.join(lacking)}")
    return cls(**kw)


def _row_id(row) -> str:
    return "-".join(str(v) for v in row)


def _assert_parity(record, family, ours, theirs, x, y, tol=TOL):
    a, ga = _value_and_grad(ours, x, y)
    b, gb = _value_and_grad(theirs, x, y, shape=a.shape)
    record.add(family, float((a - b).abs().max()), float((ga - gb).abs().max()))
    torch.testing.assert_close(a, b.to(a.dtype), atol=tol, rtol=0)
    torch.testing.assert_close(ga, gb, atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# 1. parity with the installed MONAI classes
# --------------------------------------------------------------------------------------------------------------------

DICE_CORE_GRID = list(
    itertools.product(SHAPES, (True, False), ACTS, ("label", "onehot"), (False, True), (False, True), (False, True),
                      REDUCTIONS)
)  # fmt: skip


def _dice_core_case(dims, include_background, act, target_kind, squared_pred, jaccard, batch, reduction,
                    dtype=torch.float64):  # fmt: skip
    """(ours, MONAI's, logits, target) of one DICE_CORE_GRID row."""
    x, labels = _make_case(SHAPES[dims], dtype=dtype)
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", squared_pred=squared_pred,
              jaccard=jaccard, batch=batch, reduction=reduction, **ACTS[act])  # fmt: skip
    return DicePlusLoss(**kw), ML.DiceLoss(**kw), x, _target(labels, x.shape[1], target_kind)


@pytest.mark.parametrize("row", DICE_CORE_GRID, ids=_row_id)
def test_dice_matches_monai_dice_loss(parity_record, row):
    _assert_parity(parity_record, "DiceLoss", *_dice_core_case(*row))


DICE_WEIGHT_IGNORE_GRID = list(
    itertools.product((True, False), ACTS, ("label", "onehot"), (None, "scalar", "per_kept_class"),
                      (None, 255, -1), (False, True), REDUCTIONS)
)  # fmt: skip


def _dice_weight_ignore_case(include_background, act, target_kind, weight, ignore_index, batch, reduction,
                             dtype=torch.float64):  # fmt: skip
    """(ours, MONAI's, logits, target) of one DICE_WEIGHT_IGNORE_GRID row."""
    x, labels = _make_case(SHAPES["3d"], dtype=dtype)
    c = x.shape[1]
    if ignore_index is not None:
        labels = _with_ignored(labels, ignore_index)
    w = {None: None, "scalar": 0.7, "per_kept_class": _class_weight(c if include_background else c - 1)}[weight]
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", batch=batch,
              reduction=reduction, weight=w, ignore_index=ignore_index, **ACTS[act])  # fmt: skip
    return DicePlusLoss(**kw), _monai(ML.DiceLoss, **kw), x, _target(labels, c, target_kind)


@pytest.mark.parametrize("row", DICE_WEIGHT_IGNORE_GRID, ids=_row_id)
def test_dice_weight_and_ignore_index_match_monai(parity_record, row):
    _assert_parity(parity_record, "DiceLoss weight/ignore_index", *_dice_weight_ignore_case(*row))


DICE_CE_GRID = list(
    itertools.product((True, False), ("label", "onehot"), (False, True), ((1.0, 1.0), (0.5, 0.5), (1.0, 0.0)),
                      (False, True), (False, True), (False, True), ("mean", "sum"))
)  # fmt: skip


def _dice_ce_case(include_background, target_kind, weighted, lambdas, squared_pred, jaccard, batch, reduction,
                  dtype=torch.float64):  # fmt: skip
    """(ours, MONAI's, logits, target) of one DICE_CE_GRID row; weight of length C (DiceCELoss's convention: CE
    uses all, Dice drops the first without background)."""
    x, labels = _make_case(SHAPES["2d"], dtype=dtype)
    c = x.shape[1]
    lambda_dice, lambda_ce = lambdas
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", softmax=True,
              squared_pred=squared_pred, jaccard=jaccard, batch=batch, reduction=reduction, lambda_dice=lambda_dice,
              lambda_ce=lambda_ce, weight=_class_weight(c, dtype) if weighted else None)  # fmt: skip
    return DiceCEPlusLoss(**kw), ML.DiceCELoss(**kw), x, _target(labels, c, target_kind)


@pytest.mark.parametrize("row", DICE_CE_GRID, ids=_row_id)
def test_dice_ce_matches_monai_dice_ce_loss(parity_record, row):
    _assert_parity(parity_record, "DiceCELoss", *_dice_ce_case(*row))


@pytest.mark.parametrize(
    "weighted,squared_pred,reduction", list(itertools.product((False, True), (False, True), ("mean", "sum")))
)
def test_dice_ce_one_channel_sigmoid_matches_monai(make_case, parity_record, weighted, squared_pred, reduction):
    """One channel: MONAI uses BCE-with-logits with ``pos_weight=weight``; so do we."""
    x, labels = make_case((2, 2, 6, 6))
    x = x[:, :1].detach()
    y = labels.double()
    kw = dict(sigmoid=True, squared_pred=squared_pred, reduction=reduction, lambda_ce=0.6,
              weight=torch.tensor([1.7], dtype=torch.float64) if weighted else None)  # fmt: skip
    _assert_parity(parity_record, "DiceCELoss 1-channel BCE", DicePlusLoss(**kw), ML.DiceCELoss(**kw), x, y)


TVERSKY_GRID = list(
    itertools.product(SHAPES, (True, False), ACTS, ("label", "onehot"), ((0.5, 0.5), (0.3, 0.7), (0.9, 0.2)),
                      (False, True), (None, 255), REDUCTIONS)
)  # fmt: skip


def _tversky_case(dims, include_background, act, target_kind, alpha_beta, batch, ignore_index, reduction,
                  dtype=torch.float64):  # fmt: skip
    """(ours, MONAI's, logits, target) of one TVERSKY_GRID row."""
    x, labels = _make_case(SHAPES[dims], dtype=dtype)
    labels = labels if ignore_index is None else _with_ignored(labels, ignore_index)
    alpha, beta = alpha_beta
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", alpha=alpha, beta=beta,
              batch=batch, ignore_index=ignore_index, reduction=reduction, **ACTS[act])  # fmt: skip
    return TverskyPlusLoss(**kw), _monai(ML.TverskyLoss, **kw), x, _target(labels, x.shape[1], target_kind)


@pytest.mark.parametrize("row", TVERSKY_GRID, ids=_row_id)
def test_tversky_matches_monai_tversky_loss(parity_record, row):
    _assert_parity(parity_record, "TverskyLoss", *_tversky_case(*row))


FOCAL_SETTINGS = ((2.0, None), (1.5, 0.25), (0.0, 0.75))  # (gamma, alpha)
DICE_FOCAL_GRID = list(
    itertools.product(SHAPES, (True, False), ACTS, ("label", "onehot"), FOCAL_SETTINGS, (False, True),
                      (False, True), ("mean", "sum"))
)  # fmt: skip


def _dice_focal_case(dims, include_background, act, target_kind, focal, weighted, batch, reduction,
                     dtype=torch.float64):  # fmt: skip
    """(ours, MONAI's, logits, target) of one DICE_FOCAL_GRID row; weight of one value per kept class (what both of
    MONAI's terms take)."""
    x, labels = _make_case(SHAPES[dims], dtype=dtype)
    c = x.shape[1]
    gamma, alpha = focal
    kept = c if include_background else c - 1
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", gamma=gamma, alpha=alpha,
              weight=_class_weight(kept, dtype) if weighted else None, batch=batch, reduction=reduction,
              lambda_dice=0.7, **ACTS[act])  # fmt: skip
    return DiceFocalPlusLoss(**kw), ML.DiceFocalLoss(**kw), x, _target(labels, c, target_kind)


@pytest.mark.parametrize("row", DICE_FOCAL_GRID, ids=_row_id)
def test_dice_focal_matches_monai_dice_focal_loss(parity_record, row):
    _assert_parity(parity_record, "DiceFocalLoss", *_dice_focal_case(*row))


GDL_FOCAL_GRID = list(
    itertools.product(SHAPES, (True, False), ACTS, ("label", "onehot"), ("square", "simple", "uniform"), (2.0, 0.5),
                      (False, True), (False, True), ("mean", "sum"))
)  # fmt: skip


def _gdl_focal_case(dims, include_background, act, target_kind, w_type, gamma, weighted, batch, reduction,
                    dtype=torch.float64):  # fmt: skip
    """(ours, MONAI's, logits, target) of one GDL_FOCAL_GRID row (``normalize_weights=False``; ``weight`` weighs
    the focal term alone, as MONAI's)."""
    x, labels = _make_case(SHAPES[dims], dtype=dtype)
    c = x.shape[1]
    kept = c if include_background else c - 1
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", w_type=w_type, gamma=gamma,
              weight=_class_weight(kept, dtype) if weighted else None, batch=batch, reduction=reduction,
              lambda_gdl=0.6, **ACTS[act])  # fmt: skip
    ours = GeneralizedDiceFocalPlusLoss(normalize_weights=False, **kw)
    return ours, ML.GeneralizedDiceFocalLoss(**kw), x, _target(labels, c, target_kind)


@pytest.mark.parametrize("row", GDL_FOCAL_GRID, ids=_row_id)
def test_gdl_focal_matches_monai_generalized_dice_focal_loss(parity_record, row):
    _assert_parity(parity_record, "GeneralizedDiceFocalLoss", *_gdl_focal_case(*row))


GDL_GRID = list(
    itertools.product(SHAPES, (True, False), ACTS, ("label", "onehot"), ("square", "simple", "uniform"),
                      (False, True), REDUCTIONS)
)  # fmt: skip


def _gdl_case(dims, include_background, act, target_kind, w_type, batch, reduction, dtype=torch.float64):
    """(ours, MONAI's, logits, target) of one GDL_GRID row: ``normalize_weights=False``; the last sample lacks the
    last class (MONAI's max-weight rule)."""
    x, labels = _make_case(SHAPES[dims], dtype=dtype)
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", w_type=w_type, batch=batch,
              reduction=reduction, **ACTS[act])  # fmt: skip
    ours = GeneralizedDicePlusLoss(normalize_weights=False, **kw)
    return ours, ML.GeneralizedDiceLoss(**kw), x, _target(labels, x.shape[1], target_kind)


@pytest.mark.parametrize("row", GDL_GRID, ids=_row_id)
def test_gdl_matches_monai_generalized_dice_loss(parity_record, row):
    _assert_parity(parity_record, "GeneralizedDiceLoss", *_gdl_case(*row))


# GeneralizedWassersteinDiceLoss: label maps only, the softmax inside; several class counts and two kinds of matrix
GWDL_GRID = list(
    itertools.product(SHAPES, (2, 3, 5), ("unit", "scaled"), ("B1S", "BS"), ("default", "GDL"), REDUCTIONS)
)  # fmt: skip


def _dist_matrix(c: int, kind: str, dtype=torch.float64) -> torch.Tensor:
    """``"unit"``: 1 off the diagonal (plain soft Dice distances); ``"scaled"``: seeded symmetric distances in
    [0, 3] with a zero diagonal (MONAI divides them by their maximum)."""
    if kind == "unit":
        return (1.0 - torch.eye(c, dtype=dtype))
    g = torch.Generator().manual_seed(c)
    m = 3.0 * torch.rand(c, c, generator=g, dtype=dtype)
    return (m + m.T).fill_diagonal_(0.0) / 2.0


# before MONAI 1.6, GeneralizedWassersteinDiceLoss mixed the samples of a batch (its (B, 1, N) class weights broadcast
# against the (B, N) distances into (B, B, N)) and could not reshape reduction="none" into (B, C, 1, ...); one sample
# at a time it is right. On those releases the reference runs it per sample and reduces as 1.6 does.
_GWDL_PER_SAMPLE = tuple(int(v) for v in monai.__version__.split(".")[:2]) < (1, 6)


def _monai_gwdl(dist_matrix, weighting_mode="default", reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5):
    """MONAI's GeneralizedWassersteinDiceLoss, on any supported MONAI (see ``_GWDL_PER_SAMPLE``)."""
    if not _GWDL_PER_SAMPLE:
        return ML.GeneralizedWassersteinDiceLoss(dist_matrix, weighting_mode, reduction, smooth_nr, smooth_dr)
    one = ML.GeneralizedWassersteinDiceLoss(dist_matrix, weighting_mode, "sum", smooth_nr, smooth_dr)

    def per_sample(x, y):
        f = torch.stack([one(x[i: i + 1], y[i: i + 1]) for i in range(x.shape[0])])
        return {"mean": f.mean(), "sum": f.sum()}.get(reduction, f)

    return per_sample


def _gwdl_case(dims, c, matrix, target_form, weighting_mode, reduction, dtype=torch.float64):
    """(ours, MONAI's, logits, labels) of one GWDL_GRID row: labels (B, 1, *S) or (B, *S); the last sample lacks the
    last class."""
    x, labels = _make_case((SHAPES[dims][0], c, *SHAPES[dims][2:]), dtype=dtype)
    m = _dist_matrix(c, matrix, torch.float32)
    ours = GeneralizedWassersteinDicePlusLoss(m, weighting_mode, reduction)
    theirs = _monai_gwdl(m, weighting_mode, reduction)
    return ours, theirs, x, labels if target_form == "B1S" else labels[:, 0]


@pytest.mark.parametrize("row", GWDL_GRID, ids=_row_id)
def test_gwdl_matches_monai_generalized_wasserstein_dice_loss(parity_record, row):
    _assert_parity(parity_record, "GeneralizedWassersteinDiceLoss", *_gwdl_case(*row))


@pytest.mark.parametrize(
    "name,ours,theirs",
    [
        (
            "dice softmax label",
            DicePlusLoss(to_onehot_y=True, softmax=True),
            ML.DiceLoss(to_onehot_y=True, softmax=True),
        ),
        (
            "dice sigmoid squared batch",
            DicePlusLoss(sigmoid=True, squared_pred=True, batch=True, include_background=False),
            ML.DiceLoss(sigmoid=True, squared_pred=True, batch=True, include_background=False),
        ),
        (
            "dice ignore 255 weight",
            DicePlusLoss(to_onehot_y=True, softmax=True, ignore_index=255, weight=[0.2, 0.4, 0.6, 0.8]),
            _monai(ML.DiceLoss, to_onehot_y=True, softmax=True, ignore_index=255, weight=[0.2, 0.4, 0.6, 0.8]),
        ),
        (
            "gdl softmax label",
            GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, normalize_weights=False),
            ML.GeneralizedDiceLoss(to_onehot_y=True, softmax=True),
        ),
        (
            "dice ce",
            DicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=1.0, weight=torch.tensor([0.2, 0.4, 0.6, 0.8])),
            ML.DiceCELoss(to_onehot_y=True, softmax=True, weight=torch.tensor([0.2, 0.4, 0.6, 0.8])),
        ),
    ],
)
def test_float32_parity_spot_checks(make_case, parity_record, name, ours, theirs):
    x, labels = make_case(SHAPES["3d"], dtype=torch.float32)
    if "255" in name:
        labels = _with_ignored(labels, 255)
    y = labels if ours.to_onehot_y else R.one_hot(labels[:, 0], 4, torch.float32)
    _assert_parity(parity_record, "float32 spot checks", ours, theirs, x, y)


@pytest.mark.parametrize("loss_name,squared_pred", [("dice", False), ("dice", True), ("gdl", False)])
def test_soft_label_matches_monai(make_case, parity_record, loss_name, squared_pred):
    x, _ = make_case(SHAPES["2d"])
    y = torch.softmax(torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype), 1)
    if loss_name == "dice":
        kw = dict(softmax=True, soft_label=True, squared_pred=squared_pred)
        ours, theirs = DicePlusLoss(**kw), _monai(ML.DiceLoss, **kw)
    else:
        kw = dict(softmax=True, soft_label=True)
        ours, theirs = GeneralizedDicePlusLoss(normalize_weights=False, **kw), _monai(ML.GeneralizedDiceLoss, **kw)
    _assert_parity(parity_record, "soft_label", ours, theirs, x, y)


def test_other_act_is_not_clamped_and_matches_monai(make_case, parity_record):
    """An activation leaving [0, 1] (log_softmax) gives MONAI's value: no clamping."""
    x, labels = make_case(SHAPES["2d"])

    def act(t):
        return torch.log_softmax(t, 1)

    kw = dict(to_onehot_y=True, other_act=act)
    _assert_parity(parity_record, "other_act", DicePlusLoss(**kw), ML.DiceLoss(**kw), x, labels)
    value = DicePlusLoss(**kw)(x, labels)
    clamped = DicePlusLoss(to_onehot_y=True, other_act=lambda t: act(t).clamp(0, 1))(x, labels)
    assert abs(float(value.detach()) - float(clamped.detach())) > 0.1


@pytest.mark.parametrize("target_kind", ["label", "onehot"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
def test_in_range_ignore_index_drops_the_channel_monai_keeps(
    make_case, parity_record, target_kind, include_background, batch
):
    """Departure: ignore_index=2 drops channel 2; every other per-class value equals MONAI's."""
    x, labels = make_case(SHAPES["3d"])
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", softmax=True, batch=batch,
              ignore_index=2, reduction="none")  # fmt: skip
    y = _target(labels, 4, target_kind)
    ours = DicePlusLoss(**kw)
    theirs = _monai(ML.DiceLoss, **kw)
    kept = [k for k in range(0 if include_background else 1, 4) if k != 2]
    columns = [k - (0 if include_background else 1) for k in kept]

    def theirs_kept(a, b):
        v = theirs(a, b)
        v = v.reshape(v.shape[: 1 if batch else 2])
        return v[..., columns]

    assert ours(x, y).shape[-1] == len(kept) == theirs(x, y).shape[1 if not batch else 0] - 1
    _assert_parity(parity_record, "DiceLoss in-range ignore", ours, theirs_kept, x, y)


# before MONAI 1.6, MaskedDiceLoss masked the logits and activated after (masked voxels then count at p = 1/C for a
# softmax): parity is with 1.6's form, which activates first
_MASKED_MONAI = tuple(int(v) for v in monai.__version__.split(".")[:2]) >= (1, 6)
_MASKED_PARITY = pytest.mark.skipif(not _MASKED_MONAI,
                                    reason=f"MONAI {monai.__version__}'s MaskedDiceLoss activates after masking")

# MaskedDiceLoss's grid: its DiceLoss arguments, one-hot targets with and without background and label maps without
# it (with background a label map is a documented departure: test_masked_dice_departure_with_a_label_map_and_background)
MASKED_DICE_GRID = list(
    itertools.product(SHAPES, ((True, "onehot"), (False, "onehot"), (False, "label")), ACTS,
                      ("linear", "squared", "jaccard"), (False, True), REDUCTIONS, (None, "per_kept_class"))
)  # fmt: skip


class _WithMask:
    """A masked loss called as ``loss(x, y)`` (the grids' two-argument call), its region ``mask`` bound; attributes
    are the loss's."""

    def __init__(self, loss, mask: torch.Tensor) -> None:
        self.loss, self.mask = loss, mask

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x, y, self.mask.to(x.dtype))

    def __getattr__(self, name: str):
        return getattr(self.loss, name)


def _masked_dice_case(dims, background_target, act, form, batch, reduction, weight, dtype=torch.float64):
    """(ours, MONAI's, logits, target) of one MASKED_DICE_GRID row, each with the same region mask bound: about 70%
    of the voxels, one mask per sample in 3-D, one for the whole batch (1, 1, *S) in 2-D."""
    include_background, target_kind = background_target
    x, labels = _make_case(SHAPES[dims], dtype=dtype)
    b, c = x.shape[:2]
    g = torch.Generator().manual_seed(11)
    mask = (torch.rand((b if dims == "3d" else 1, 1, *x.shape[2:]), generator=g) > 0.3).to(torch.float64)
    w = None if weight is None else _class_weight(c if include_background else c - 1)
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", batch=batch,
              reduction=reduction, weight=w, squared_pred=form == "squared", jaccard=form == "jaccard",
              **ACTS[act])  # fmt: skip
    theirs = _monai(ML.MaskedDiceLoss, **kw) if _MASKED_MONAI else _NotInThisMonai("MaskedDiceLoss before 1.6")
    return (_WithMask(MaskedDicePlusLoss(**kw), mask), _WithMask(theirs, mask), x,
            _target(labels, c, target_kind))  # fmt: skip


@_MASKED_PARITY
@pytest.mark.parametrize("row", MASKED_DICE_GRID, ids=_row_id)
def test_masked_dice_matches_monai_masked_dice_loss(parity_record, row):
    _assert_parity(parity_record, "MaskedDiceLoss", *_masked_dice_case(*row))


PARITY_GRIDS = {
    "DiceLoss": (DICE_CORE_GRID, _dice_core_case),
    "DiceLoss weight/ignore_index": (DICE_WEIGHT_IGNORE_GRID, _dice_weight_ignore_case),
    "DiceCELoss": (DICE_CE_GRID, _dice_ce_case),
    "GeneralizedDiceLoss": (GDL_GRID, _gdl_case),
    "TverskyLoss": (TVERSKY_GRID, _tversky_case),
    "DiceFocalLoss": (DICE_FOCAL_GRID, _dice_focal_case),
    "GeneralizedDiceFocalLoss": (GDL_FOCAL_GRID, _gdl_focal_case),
    "GeneralizedWassersteinDiceLoss": (GWDL_GRID, _gwdl_case),
    "MaskedDiceLoss": (MASKED_DICE_GRID, _masked_dice_case),
}
# MONAI arguments the grids leave at their defaults: each has a test of its own above or below (DiceCELoss's
# sigmoid: test_dice_ce_one_channel_sigmoid_matches_monai; with C > 1 our BCE term is a documented departure)
_VARIED_ELSEWHERE = {"other_act", "smooth_nr", "smooth_dr", "soft_label", "label_smoothing", "ce_weight"}
_VARIED_ELSEWHERE_BY_CLASS = {"DiceCELoss": {"sigmoid", "softmax"}, "DiceFocalLoss": {"squared_pred", "jaccard",
                              "lambda_dice", "lambda_focal"}, "GeneralizedDiceFocalLoss": {"lambda_gdl",
                              "lambda_focal"}}  # fmt: skip
# (the focal presets' lambdas: test_focal_lambdas_match_monai; DiceFocal's squared_pred and jaccard are DiceLoss's)


@pytest.mark.parametrize(
    "monai_cls,families",
    [(ML.DiceLoss, ["DiceLoss", "DiceLoss weight/ignore_index"]), (ML.DiceCELoss, ["DiceCELoss"]),
     (ML.GeneralizedDiceLoss, ["GeneralizedDiceLoss"]), (ML.TverskyLoss, ["TverskyLoss"]),
     (ML.DiceFocalLoss, ["DiceFocalLoss"]), (ML.GeneralizedDiceFocalLoss, ["GeneralizedDiceFocalLoss"]),
     pytest.param(ML.MaskedDiceLoss, ["MaskedDiceLoss"], marks=_MASKED_PARITY)],
    ids=["DiceLoss", "DiceCELoss", "GeneralizedDiceLoss", "TverskyLoss", "DiceFocalLoss", "GeneralizedDiceFocalLoss",
         "MaskedDiceLoss"],
)  # fmt: skip
def test_parity_grids_vary_every_monai_argument(monai_cls, families):
    """Every argument of the MONAI class takes at least two values across its grids (a grid that stops varying an
    argument, or a MONAI release adding one, fails here)."""
    seen: dict[str, set] = {}
    for family in families:
        grid, build = PARITY_GRIDS[family]
        for row in grid:
            ours = build(*row)[0]
            weight = None if ours.class_weight is None else tuple(ours.class_weight.reshape(-1).tolist())
            alpha, beta = ours.tversky or (ours.focal_alpha, None)
            values = {**dataclasses.asdict(ours.options), "weight": weight, "alpha": alpha, "beta": beta,
                      "lambda_gdl": ours.lambda_dice}  # fmt: skip
            for name, value in values.items():
                seen.setdefault(name, set()).add(value)
    args = set(inspect.signature(monai_cls.__init__).parameters) - {"self"} - _VARIED_ELSEWHERE
    args -= _VARIED_ELSEWHERE_BY_CLASS.get(monai_cls.__name__, set())
    missing = {a for a in args if len(seen.get(a, ())) < 2}
    assert not missing, f"{monai_cls.__name__} arguments never varied by the parity grids: {sorted(missing)}"


# --------------------------------------------------------------------------------------------------------------------
# 1b. the parity grids under autocast (MONAI trainers default to amp: float16 autocast on CUDA; the CPU's stands in)
# --------------------------------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (0 when both are 0)."""
    scale = float(b.abs().max())
    return float((a.float() - b.float()).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def _float32_target(y: torch.Tensor) -> torch.Tensor:
    return y.float() if y.is_floating_point() else y


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", PARITY_GRIDS)
def test_parity_grids_under_autocast(autocast_record, family, dtype):
    """Every row of the MONAI parity grids, in float32, under CPU autocast:

    - float32 logits (a loss called on float32 outputs inside ``autocast``): value and gradient equal float32 eager
      to 1e-5 of the largest gradient, and MONAI's value under the same autocast;
    - logits in the autocast dtype (what a network returns under AMP): value equal to the float32 loss on those
      rounded logits (1e-5), gradient within the dtype's resolution of it.
    """
    grid, build = PARITY_GRIDS[family]
    eps = torch.finfo(dtype).eps
    failures = []
    for row in grid:
        ours, theirs, x, y = build(*row, dtype=torch.float32)
        if isinstance(theirs, _NotInThisMonai):  # a row the installed MONAI cannot build: left out, not the family
            continue
        y = _float32_target(y)
        ref_v, ref_g = _value_and_grad(ours, x, y)
        monai_v = _value_and_grad(theirs, x, y, shape=ref_v.shape)[0]
        with torch.autocast("cpu", dtype=dtype):
            v32, g32 = _value_and_grad(ours, x, y)
            monai_amp_v = _value_and_grad(theirs, x, y, shape=ref_v.shape)[0]
        xr = x.detach().to(dtype)
        rounded_v, rounded_g = _value_and_grad(ours, xr.float(), y)
        monai_rounded_v = _value_and_grad(theirs, xr.float(), y, shape=ref_v.shape)[0]
        with torch.autocast("cpu", dtype=dtype):
            vh, gh = _value_and_grad(ours, xr, y)
            monai_h = _value_and_grad(theirs, xr, y, shape=ref_v.shape)[0]
        dev = {
            "value f32 logits": float((v32 - ref_v).abs().max()),
            "grad f32 logits": _rel(g32, ref_g),
            "value half logits": float((vh.float() - rounded_v).abs().max()),
            "grad half logits": _rel(gh, rounded_g),
            "MONAI value f32 logits": float((monai_amp_v - monai_v).abs().max()),
            "MONAI value half logits": float((monai_h.float() - monai_rounded_v).abs().max()),
        }
        autocast_record.add(f"{family} {str(dtype)[6:]}", dev)
        ok = (
            dev["value f32 logits"] <= TOL and dev["grad f32 logits"] <= TOL and dev["value half logits"] <= TOL
            and dev["grad half logits"] <= eps and float((v32 - monai_amp_v).abs().max()) <= TOL
            and vh.dtype == torch.float32 and gh.dtype == dtype
        )  # fmt: skip
        if not ok:
            failures.append((row, dev))
    assert not failures, f"{len(failures)} of {len(grid)} rows off under autocast, first: {failures[:3]}"


# --------------------------------------------------------------------------------------------------------------------
# 1c. the family by name: each preset takes its MONAI class's arguments in MONAI's order, with MONAI's defaults
# --------------------------------------------------------------------------------------------------------------------

FAMILY = [
    (DicePlusLoss, ML.DiceLoss),
    (DiceCEPlusLoss, ML.DiceCELoss),
    (DiceFocalPlusLoss, ML.DiceFocalLoss),
    (GeneralizedDicePlusLoss, ML.GeneralizedDiceLoss),
    (GeneralizedDiceFocalPlusLoss, ML.GeneralizedDiceFocalLoss),
    (TverskyPlusLoss, ML.TverskyLoss),
    (MaskedDicePlusLoss, ML.MaskedDiceLoss),
]


# positional arguments MONAI appended after 1.4 (soft_label in 1.5, ignore_index in 1.6); our presets take them always
_ADDED_SINCE_MONAI_1_4 = {"DiceLoss": ("soft_label", "ignore_index"), "GeneralizedDiceLoss": ("soft_label",),
                          "TverskyLoss": ("soft_label", "ignore_index"), "MaskedDiceLoss": ("soft_label",)}  # fmt: skip


@pytest.mark.parametrize("ours,theirs", FAMILY, ids=lambda c: c.__name__)
def test_signature_is_monai_s(ours, theirs):
    """MONAI's positional arguments, in order, with the same names and defaults; our extensions keyword-only."""
    monai_params = [p for n, p in inspect.signature(theirs.__init__).parameters.items() if n != "self"]
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in monai_params):  # MaskedDiceLoss before MONAI 1.6
        pytest.skip(f"MONAI {monai.__version__}'s {theirs.__name__} takes *args, **kwargs")
    our_params = list(inspect.signature(ours).parameters.values())
    assert [p.name for p in our_params[: len(monai_params)]] == [p.name for p in monai_params]
    for mine, its in zip(our_params, monai_params, strict=False):
        default = its.default.value if hasattr(its.default, "value") else its.default  # MONAI's enum defaults
        assert mine.default == default, (mine.name, mine.default, default)
        assert mine.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    # after MONAI's: our extensions, keyword-only, and on an older MONAI the arguments its later releases append
    later = [p.name for p in our_params[len(monai_params):] if p.kind != inspect.Parameter.KEYWORD_ONLY]
    added = [n for n in _ADDED_SINCE_MONAI_1_4.get(theirs.__name__, ()) if n not in {p.name for p in monai_params}]
    assert later == added, (later, added)


@pytest.mark.parametrize("ours,theirs", FAMILY, ids=lambda c: c.__name__)
def test_positional_call_equals_monai(make_case, parity_record, ours, theirs):
    """Positional arguments land where MONAI puts them (include_background=False, to_onehot_y=True, softmax)."""
    x, labels = make_case(SHAPES["3d"])
    args = (False, True, False, True)
    kw = {"normalize_weights": False} if issubclass(ours, GeneralizedDicePlusLoss) else {}
    _assert_parity(parity_record, "positional calls", ours(*args, **kw), theirs(*args), x, labels)


def test_dice_ce_preset_keeps_monai_s_cross_entropy_default(make_case, parity_record):
    """The model zoo's DiceCELoss bundles rely on lambda_ce=1 by default: renaming the class keeps the CE term."""
    x, labels = make_case(SHAPES["3d"])
    kw = dict(to_onehot_y=True, softmax=True, squared_pred=True, batch=True)
    _assert_parity(parity_record, "DiceCELoss defaults", DiceCEPlusLoss(**kw), ML.DiceCELoss(**kw), x, labels)
    assert DiceCEPlusLoss(**kw).lambda_ce == 1.0 and DicePlusLoss(**kw).lambda_ce == 0.0


def test_options_are_attributes_and_in_repr():
    loss = TverskyPlusLoss(to_onehot_y=True, softmax=True, alpha=0.2, beta=0.8, lambda_ce=0.5, weight=[1.0, 2.0])
    assert (loss.to_onehot_y, loss.tversky, loss.lambda_ce, loss.reduction) == (True, (0.2, 0.8), 0.5, "mean")
    assert repr(loss) == (
        "TverskyPlusLoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, tversky=(0.2, 0.8), weight=[1.0, 2.0])"
    )
    with pytest.raises(AttributeError, match="lambda_cee"):
        _ = loss.lambda_cee


TVERSKY_EXT_GRID = list(
    itertools.product(("dice", "gdl"), ((0.3, 0.7), (1.0, 0.0)), (True, False), ("label", "onehot"),
                      (None, 255, 2), (False, True), (None, "full"))
)  # fmt: skip


@pytest.mark.parametrize("loss_name,alpha_beta,include_background,target_kind,ignore_index,batch,weight",
                         TVERSKY_EXT_GRID)  # fmt: skip
def test_tversky_and_generalised_tversky_match_reference(
    make_case, loss_name, alpha_beta, include_background, target_kind, ignore_index, batch, weight
):
    """Salehi et al. 2017 from its per-class TP, FP, FN loops, with static weights, ignore_index (an in-range one
    drops its channel) and batch; for GDL the class weights multiply TP, FP and FN (generalised Tversky)."""
    x, labels = make_case(SHAPES["3d"])
    c = x.shape[1]
    labels = _with_ignored(labels, 255) if ignore_index == 255 else labels
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", softmax=True,
              tversky=alpha_beta, ignore_index=ignore_index, batch=batch, weight=_weight_for(weight, c),
              reduction="none")  # fmt: skip
    cls, fn = (DicePlusLoss, R.dice_loss) if loss_name == "dice" else (GeneralizedDicePlusLoss, R.generalized_dice_loss)

    def ref(a, b):
        return fn(a, b, **kw)

    _assert_matches_reference(cls(**kw), ref, x, _target(labels, c, target_kind))


@pytest.mark.parametrize("lambdas", [(1.0, 0.0), (0.0, 1.0), (0.3, 2.0)])
@pytest.mark.parametrize("ours,theirs,first", [(DiceFocalPlusLoss, ML.DiceFocalLoss, "lambda_dice"),
                                               (GeneralizedDiceFocalPlusLoss, ML.GeneralizedDiceFocalLoss,
                                                "lambda_gdl")], ids=["DiceFocal", "GDLFocal"])  # fmt: skip
def test_focal_lambdas_match_monai(make_case, parity_record, ours, theirs, first, lambdas):
    x, labels = make_case(SHAPES["3d"])
    kw = {"to_onehot_y": True, "softmax": True, first: lambdas[0], "lambda_focal": lambdas[1]}
    extra = {"normalize_weights": False} if ours is GeneralizedDiceFocalPlusLoss else {}
    _assert_parity(parity_record, "focal lambdas", ours(**kw, **extra), theirs(**kw), x, labels)


# --------------------------------------------------------------------------------------------------------------------
# 2. extensions against tests/reference.py
# --------------------------------------------------------------------------------------------------------------------


GDL_EXT_GRID = list(
    itertools.product((False, True), (False, True), ("square", "simple", "uniform"), (True, False),
                      ("max", "zero", 0.3), (False, True))
)  # fmt: skip


@pytest.mark.parametrize("squared_pred,jaccard,w_type,normalize_weights,absent_weight,batch", GDL_EXT_GRID)
def test_gdl_extensions_match_reference(
    make_case, squared_pred, jaccard, w_type, normalize_weights, absent_weight, batch
):
    x, y = make_case(SHAPES["3d"])
    kw = dict(to_onehot_y=True, softmax=True, squared_pred=squared_pred, jaccard=jaccard, w_type=w_type,
              normalize_weights=normalize_weights, absent_weight=absent_weight, batch=batch,
              reduction="none")  # fmt: skip

    def ref(a, b):
        return R.generalized_dice_loss(a, b, **kw)

    _assert_matches_reference(GeneralizedDicePlusLoss(**kw), ref, x, y)


def test_gdl_128_cubed_wrong_prediction_scores_near_one():
    """A completely wrong prediction at 128^3 with w_type='square': ~1.0 with our default; MONAI gives ~0.46."""
    n = 128
    slab = (torch.arange(n) * 3 // n).reshape(n, 1, 1).expand(n, n, n)
    labels = slab.reshape(1, 1, n, n, n)
    wrong = R.one_hot((labels[:, 0] + 1) % 3, 3, torch.float32)  # every voxel predicted as another class
    ours = float(GeneralizedDicePlusLoss(to_onehot_y=True)(wrong, labels))
    monai_value = float(ML.GeneralizedDiceLoss(to_onehot_y=True)(wrong, labels))
    ours_unnormalised = float(GeneralizedDicePlusLoss(to_onehot_y=True, normalize_weights=False)(wrong, labels))
    assert ours > 0.99
    assert monai_value < 0.6
    assert abs(ours_unnormalised - monai_value) < 1e-5  # normalize_weights=False reproduces MONAI, even here


@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("target_kind", ["label", "onehot"])
def test_gdl_empty_sample_penalises_false_positives(normalize_weights, target_kind):
    """Departure: a sample with no included class present still penalises confident false positives."""
    x = torch.zeros(2, 3, 6, 6, dtype=torch.float64)
    x[:, 1] = 8.0  # confident foreground everywhere
    x.requires_grad_(True)
    labels = torch.zeros(2, 1, 6, 6, dtype=torch.long)  # background only
    y = _target(labels, 3, target_kind)
    kw = dict(include_background=False, to_onehot_y=target_kind == "label", softmax=True)
    ours = GeneralizedDicePlusLoss(normalize_weights=normalize_weights, **kw)(x, y)
    (grad,) = torch.autograd.grad(ours, x)
    assert 0.95 < float(ours.detach()) <= 1.0  # 36 confident false-positive voxels: S / (S + 1) ~ 36 / 37
    assert float(grad.abs().max()) > 0
    expected = R.generalized_dice_loss(x, y, normalize_weights=normalize_weights, **kw)
    torch.testing.assert_close(ours, expected)
    # MONAI: zero loss and zero gradient, so the false positives are never penalised
    xm = x.detach().clone().requires_grad_(True)
    theirs = ML.GeneralizedDiceLoss(**kw)(xm, y)
    theirs.backward()
    assert float(theirs) == pytest.approx(0.0, abs=1e-6)
    assert float(xm.grad.abs().max()) == 0.0


def test_gdl_empty_sample_gradient_is_usable():
    """The empty rule S / (S + 1) gives false positives a gradient of training size, not a smoothing residue."""
    probs = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    probs[:, 0] = 1.0
    probs[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # one confidently wrong voxel
    probs.requires_grad_(True)
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    value = GeneralizedDicePlusLoss(include_background=False, to_onehot_y=True)(probs, labels)
    (grad,) = torch.autograd.grad(value, probs)
    assert float(value) == pytest.approx(0.5)  # S = 1 false-positive voxel: 1 / (1 + 1)
    assert float(grad[0, 1, 0, 0]) == pytest.approx(0.25)  # d/dS S/(S+1) = 1/(S+1)^2
    assert float(grad[0, 0].abs().max()) == 0.0  # background is not an included class
    right = probs.detach().clone()
    right[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # and with no false positive (S = 0) it scores 0
    assert float(GeneralizedDicePlusLoss(include_background=False, to_onehot_y=True)(right, labels)) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# 3. reduction="none" shapes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background,ignore_index,kept", [(True, None, 0), (False, None, 1), (False, 2, 2)])
def test_reduction_none_shapes(make_case, dims, batch, include_background, ignore_index, kept):
    x, y = make_case(SHAPES[dims])
    b, c = x.shape[:2]
    kw = dict(include_background=include_background, to_onehot_y=True, softmax=True, batch=batch,
              ignore_index=ignore_index, reduction="none")  # fmt: skip
    dice = DicePlusLoss(**kw)(x, y)
    gdl = GeneralizedDicePlusLoss(**kw)(x, y)
    c_kept = c - kept
    assert dice.shape == ((c_kept,) if batch else (b, c_kept))
    assert gdl.shape == (() if batch else (b,))
    # the mean of the per-class values is the default reduction
    torch.testing.assert_close(dice.mean(), DicePlusLoss(**{**kw, "reduction": "mean"})(x, y))
    torch.testing.assert_close(gdl.sum(), GeneralizedDicePlusLoss(**{**kw, "reduction": "sum"})(x, y))


# --------------------------------------------------------------------------------------------------------------------
# 4. numerics
# --------------------------------------------------------------------------------------------------------------------


def _scenario(name: str):
    """(logits, target, extra kwargs) for the awkward inputs of DESIGN.md "Numerics and bad input"."""
    g = torch.Generator().manual_seed(11)
    x = 3.0 * torch.randn(2, 4, 5, 5, 5, generator=g, dtype=torch.float32)
    labels = torch.randint(0, 4, (2, 1, 5, 5, 5), generator=g)
    if name == "empty_classes":
        return x, labels.clamp_max(1), {}
    if name == "background_only":
        return x, torch.zeros_like(labels), {}
    if name == "all_ignored_255":
        return x, torch.full_like(labels, 255), {"ignore_index": 255}
    if name == "all_ignored_in_range":
        return x, torch.full_like(labels, 2), {"ignore_index": 2}
    if name == "batch_size_1":
        return x[:1], labels[:1], {}
    raise AssertionError(name)


SCENARIOS = ("empty_classes", "background_only", "all_ignored_255", "all_ignored_in_range", "batch_size_1")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])
@pytest.mark.parametrize(
    "opts",
    [{}, {"include_background": False}, {"squared_pred": True, "batch": True}, {"jaccard": True},
     {"include_background": False, "batch": True, "jaccard": True, "squared_pred": True}],
    ids=["default", "no_bg", "squared_batch", "jaccard", "all"],
)  # fmt: skip
@pytest.mark.parametrize("target_kind", ["label", "onehot"])
def test_finite_and_in_unit_interval(scenario, loss_cls, opts, target_kind):
    x, labels, extra = _scenario(scenario)
    x.requires_grad_(True)
    y = _target(labels, 4, target_kind).float() if target_kind == "onehot" else labels
    # (label 255 one-hot encodes as an all-zero row: MONAI's "ignored voxel" for a one-hot target)
    kw = dict(to_onehot_y=target_kind == "label", softmax=True, reduction="none", **opts, **extra)
    if loss_cls is GeneralizedDicePlusLoss:
        kw["w_type"] = "square"
    value = loss_cls(**kw)(x, y)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert (value >= 0).all() and (value <= 1).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])
def test_one_channel_softmax_warns_and_stays_finite(loss_cls):
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(2, 1, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).double()
    with pytest.warns(UserWarning, match="single channel"):
        value = loss_cls(softmax=True)(probs, y)
    value.backward()
    assert torch.isfinite(value) and 0.0 <= float(value) <= 1.0
    assert torch.isfinite(probs.grad).all()


# --------------------------------------------------------------------------------------------------------------------
# 5. bad input
# --------------------------------------------------------------------------------------------------------------------

BOTH = pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])


@BOTH
def test_shape_mismatch_names_both_shapes(loss_cls):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 7\).*\(2, 3, 8, 8\)"):
        loss_cls()(x, torch.zeros(2, 3, 8, 7))
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 7\).*\(2, 3, 8, 8\)"):
        loss_cls(to_onehot_y=True)(x, torch.zeros(2, 1, 8, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 3, 8, 8\)"):
        loss_cls(to_onehot_y=True)(x, torch.zeros(2, 8, 8, dtype=torch.long))


@BOTH
def test_wrong_channel_count(loss_cls):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 2, 8, 8\)"):
        loss_cls()(x, torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"to_onehot_y"):
        loss_cls()(x, torch.zeros(2, 1, 8, 8))  # a label map without to_onehot_y


@BOTH
@pytest.mark.parametrize("bad,ignore_index", [(3, None), (-1, None), (7, 255), (255, -1)])
def test_label_values_outside_range(loss_cls, bad, ignore_index):
    x = torch.randn(2, 3, 4, 4)
    y = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    y[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=rf"label values must lie in \[0, 3\).*{bad}"):
        loss_cls(to_onehot_y=True, softmax=True, ignore_index=ignore_index)(x, y)


@BOTH
@pytest.mark.parametrize("include_background,length", [(True, 2), (True, 5), (False, 1), (False, 5)])
def test_weight_of_wrong_length(loss_cls, include_background, length):
    x = torch.randn(2, 4, 4, 4)
    y = torch.randint(0, 4, (2, 1, 4, 4))
    loss = loss_cls(to_onehot_y=True, include_background=include_background, weight=[0.5] * length)
    with pytest.raises(ValueError, match=rf"`weight` must have one value per class.*got length {length}"):
        loss(x, y)


@BOTH
def test_non_binary_one_hot_target_needs_soft_label(loss_cls):
    x = torch.randn(2, 3, 4, 4)
    y = R.one_hot(torch.randint(0, 3, (2, 4, 4)), 3, torch.float32)
    y[0, :, 0, 0] = torch.tensor([0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match=r"`target` must be binary.*soft_label"):
        loss_cls(softmax=True)(x, y)
    assert torch.isfinite(loss_cls(softmax=True, soft_label=True)(x, y))


@BOTH
def test_nan_input_with_validate(loss_cls):
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 3, 3] = float("nan")
    y = torch.randint(0, 3, (2, 1, 4, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss_cls(to_onehot_y=True, softmax=True, validate=True)(x, y)
    x[1, 2, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss_cls(to_onehot_y=True, softmax=True, validate=True)(x, y)


@BOTH
def test_non_integer_label_map(loss_cls):
    x = torch.randn(2, 3, 4, 4)
    y = torch.zeros(2, 1, 4, 4)
    y[0, 0, 1, 1] = 1.5
    with pytest.raises(ValueError, match="integer"):
        loss_cls(to_onehot_y=True, softmax=True)(x, y)


# --------------------------------------------------------------------------------------------------------------------
# module behaviour: buffers, no state change in forward, MetaTensor
# --------------------------------------------------------------------------------------------------------------------


@BOTH
def test_weight_is_a_buffer_and_forward_keeps_state(loss_cls):
    loss = loss_cls(to_onehot_y=True, softmax=True, weight=0.5)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    assert any(torch.equal(v, torch.tensor(0.5)) for v in before.values())
    x = torch.randn(2, 4, 4, 4)
    y = torch.randint(0, 4, (2, 1, 4, 4))
    loss(x, y)
    after = loss.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    loss.to(torch.float64)  # .to() converts and moves the weight with the module
    assert [v.dtype for v in loss.state_dict().values()] == [torch.float64]


@BOTH
@pytest.mark.parametrize("target_kind", ["label", "onehot"])
def test_metatensor_inputs(make_case, loss_cls, target_kind):
    x, labels = make_case(SHAPES["3d"])
    y = _target(labels, 4, target_kind)
    loss = loss_cls(to_onehot_y=target_kind == "label", softmax=True, lambda_ce=0.3)
    plain, plain_grad = _value_and_grad(loss, x, y)
    mx = MetaTensor(x.detach().clone(), affine=torch.eye(4)).requires_grad_(True)
    value = loss(mx, MetaTensor(y))
    assert not isinstance(value, MetaTensor) and value.ndim == 0
    value.backward()
    torch.testing.assert_close(value.detach(), plain)
    torch.testing.assert_close(mx.grad.as_tensor() if isinstance(mx.grad, MetaTensor) else mx.grad, plain_grad)


# --------------------------------------------------------------------------------------------------------------------
# 6. GPU-readiness without a GPU: meta device, torch.compile, graph breaks
# --------------------------------------------------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("target_kind", ["label", "onehot"])
@pytest.mark.parametrize("ignore_index", [None, 255, 2])
@pytest.mark.parametrize("lambda_ce,lambda_focal", [(0.0, 0.0), (0.5, 0.0), (0.0, 1.0)])
def test_meta_device_forward_backward(loss_cls, target_kind, ignore_index, lambda_ce, lambda_focal):
    x = torch.empty(2, 4, 6, 6, 6, device="meta", requires_grad=True)
    if target_kind == "label":
        y = torch.empty(2, 1, 6, 6, 6, dtype=torch.long, device="meta")
    else:
        y = torch.empty(2, 4, 6, 6, 6, device="meta")
    loss = loss_cls(to_onehot_y=target_kind == "label", softmax=True, ignore_index=ignore_index,
                    lambda_ce=lambda_ce, lambda_focal=lambda_focal, weight=[0.2, 0.4, 0.6, 0.8])  # fmt: skip
    value = loss(x, y)
    value.backward()
    assert value.device.type == "meta" and value.ndim == 0
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.device.type == "meta"


# a BraTS-like distance matrix (background far from every tumour class) for the Wasserstein loss
_BRATS_M = [[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.6, 0.5], [1.0, 0.6, 0.0, 0.7], [1.0, 0.5, 0.7, 0.0]]


def _gwdl(**kwargs) -> GeneralizedWassersteinDicePlusLoss:
    """The Wasserstein loss on :data:`_BRATS_M` (four classes), as the shared compile and device cases build it."""
    return GeneralizedWassersteinDicePlusLoss(_BRATS_M, **kwargs)


COMPILE_CASES = {
    "dice_ce label ignore squared": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=255,
                                                        squared_pred=True, lambda_ce=0.5)),  # fmt: skip
    "gdl label ignore squared": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=255,
                                                               squared_pred=True)),  # fmt: skip
    "dice sigmoid label weight": (DicePlusLoss, dict(to_onehot_y=True, sigmoid=True, weight=[0.2, 0.4, 0.6, 0.8])),
    "gdl ce batch in-range ignore": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=2,
                                                                   lambda_ce=1.0, batch=True)),  # fmt: skip
    "dice probabilities (plain path)": (DicePlusLoss, dict(to_onehot_y=True, other_act=lambda t: torch.softmax(t, 1),
                                                           ignore_index=255)),  # fmt: skip
    "gdl sigmoid onehot (plain path)": (GeneralizedDicePlusLoss, dict(sigmoid=True)),
    "dice focal label ignore": (DiceFocalPlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=255, alpha=0.3)),
    "gdl focal tversky": (GeneralizedDiceFocalPlusLoss, dict(to_onehot_y=True, softmax=True, tversky=(0.3, 0.7))),
    "wasserstein default": (_gwdl, dict(weighting_mode="default")),
    "wasserstein GDL ignore batch": (_gwdl, dict(weighting_mode="GDL", ignore_index=255, batch=True)),
}
# the label-map cases that take the fused path, and the custom op each stays under compile (the Wasserstein loss's:
# its soft class sums)
FUSED_COMPILE_CASES = [k for k, (_, kw) in COMPILE_CASES.items() if kw.get("to_onehot_y") and "other_act" not in kw]
COMPILED_OPS = {**dict.fromkeys(FUSED_COMPILE_CASES, "monai_gdl_plus.label_terms.default"),
                **{k: "monai_gdl_plus.soft_class_sums.default" for k, (cls, _) in COMPILE_CASES.items()
                   if cls is _gwdl}}  # fmt: skip


def _case_inputs(loss_cls, kwargs: dict):
    """Logits (2, 4, 8, 8, 8) and the case's target: labels (with voxels at 255 where ``ignore_index=255``) for
    ``to_onehot_y`` and the Wasserstein loss, their one-hot otherwise."""
    x, labels = _make_case(SHAPES["3d"], dtype=torch.float32)
    labels = _with_ignored(labels, 255) if kwargs.get("ignore_index") == 255 else labels
    labelled = kwargs.get("to_onehot_y") or loss_cls is _gwdl
    return x, labels if labelled else R.one_hot(labels[:, 0], 4, torch.float32)


def _compile_inputs(name: str):
    return _case_inputs(*COMPILE_CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILE_CASES)
def test_torch_compile_inductor_fullgraph_matches_eager(name):
    """The default backend (inductor, C++ on CPU as Triton on CUDA), fullgraph: value and gradient equal eager,
    also under float16 autocast with float16 logits (how AMP training runs the compiled loss)."""
    torch._dynamo.reset()
    loss_cls, kwargs = COMPILE_CASES[name]
    x, y = _compile_inputs(name)
    loss = loss_cls(**kwargs)
    compiled = torch.compile(loss, fullgraph=True)
    eager_value, eager_grad = _value_and_grad(loss, x, y)
    value, grad = _value_and_grad(compiled, x, y)
    torch.testing.assert_close(value, eager_value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, eager_grad, atol=1e-7, rtol=1e-5)
    half = x.detach().half()
    expected = _value_and_grad(loss, half.float(), y)[0]
    with torch.autocast("cpu", dtype=torch.float16):
        value, grad = _value_and_grad(compiled, half, y)
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()


_BAD_LABEL_SCRIPT = """
import torch
from monai_gdl_plus import DicePlusLoss
kwargs = {kwargs}
loss = torch.compile(DicePlusLoss(to_onehot_y=True, **kwargs), fullgraph=True)
x = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
y = torch.randint(0, 4, (2, 1, 8, 8, 8))
loss(x, y).backward()  # compiles with good labels first
y[1, 0, 3, 3, 3] = 7
try:
    loss(x, y).backward()
    print("no error")
except Exception as e:
    print(f"{{type(e).__name__}}: {{e}}")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs", [dict(softmax=True), dict(softmax=True, ignore_index=255), dict(other_act=torch.sigmoid)],
    ids=["fused", "fused ignore_index", "plain path"],
)  # fmt: skip
def test_compiled_bad_label_raises_a_python_exception(kwargs):
    """A label 7 among 4 classes under compile raises (a traced _assert_async) instead of aborting the interpreter
    from a generated kernel's out-of-bounds read (torch 2.8: neither raises nor aborts). In a subprocess: an abort
    must not take pytest with it."""
    shown = "{" + ", ".join(f"{k!r}: {'torch.sigmoid' if callable(v) else repr(v)}" for k, v in kwargs.items()) + "}"
    proc = subprocess.run(
        [sys.executable, "-c", _BAD_LABEL_SCRIPT.format(kwargs=shown)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "`target` label values must lie in [0, 4)" + (" or equal `ignore_index`=255" if "ignore_index" in kwargs
                                                              else "")  # fmt: skip
    # torch 2.8's inductor decomposes _assert_async(cond, msg) to nothing (2.9 lowers it to a device assertion):
    # there the clamped labels still keep the kernels' reads in bounds (no abort), but the bad label goes unreported
    expected = "no error" if torch.__version__ < (2, 9) else f"RuntimeError: {expected}."
    assert proc.stdout.strip().splitlines()[-1] == expected, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("key,shape", [("ours-dicece", (1, 105, 32, 32, 32)), ("ours-wasserstein", (2, 4, 64, 64, 64))])
def test_compiled_loss_keeps_eager_memory(key, shape):
    """Peak extra memory of a compiled forward+backward on a label map stays within a few label maps of one
    logits-sized buffer L (measured: Dice+CE 1.0 L, Wasserstein 1.8 L, its int64 label maps 0.5 L each at C = 4).
    What compile traced before the custom ops took 2.0 L for Dice+CE, and the Wasserstein loss's chunk loop,
    unrolled, 9.5 L here. Fresh subprocess, as ``gdl-plus bench``."""
    from monai_gdl_plus.app import bench

    peak = bench._peak_cpu_subprocess(key, shape, threads=2, seed=0, compiled=True)
    assert peak / (4 * math.prod(shape)) < (1.3 if key == "ours-dicece" else 2.5)


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_dynamo_explain_no_graph_breaks(name):
    """One graph, no breaks; under compile the label-map path stays one opaque op (its memory is eager's), not a
    traced autograd graph."""
    torch._dynamo.reset()
    loss_cls, kwargs = COMPILE_CASES[name]
    x, y = _compile_inputs(name)
    explanation = torch._dynamo.explain(loss_cls(**kwargs))(x.detach(), y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    if name in COMPILED_OPS:
        assert COMPILED_OPS[name] in targets, targets
        assert not [t for t in targets if "one_hot" in t or "gather" in t], targets


# aten ops that torch.use_deterministic_algorithms(True) refuses on CUDA (torch 2.13's docstring, "will throw"):
# our default path must use none of them, on the host and on the accelerator code paths alike
_NO_DETERMINISTIC_CUDA_KERNEL = (
    "nll_loss", "bincount", "histc", "put_", "cumsum", "median", "scatter_reduce", "grid_sampler", "upsample",
    "avg_pool3d", "adaptive_", "max_unpool", "reflection_pad", "ctc_loss", "embedding_bag", "fractional_max_pool",
)  # fmt: skip

DETERMINISTIC_CASES = {
    "dice+ce label smoothing": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, lambda_ce=1.0, label_smoothing=0.1,
                                                   ignore_index=255, weight=[0.2, 0.4, 0.6, 0.8])),  # fmt: skip
    "dice+ce fused": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, lambda_ce=1.0, squared_pred=True)),
    "gdl ignore batch": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=2, batch=True)),
    "dice sigmoid bce": (DicePlusLoss, dict(to_onehot_y=True, sigmoid=True, lambda_ce=0.5, ignore_index=255)),
    "gdl onehot ce": (GeneralizedDicePlusLoss, dict(softmax=True, lambda_ce=0.5)),
    "dice focal ignore": (DiceFocalPlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=255, alpha=0.3)),
    "tversky focal softmax": (TverskyPlusLoss, dict(to_onehot_y=True, softmax=True, lambda_focal=1.0,
                                                    focal_softmax=True)),  # fmt: skip
    "wasserstein default": (_gwdl, dict(weighting_mode="default")),
    "wasserstein GDL ignore batch": (_gwdl, dict(weighting_mode="GDL", ignore_index=255, batch=True)),
}


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("as_accelerator", [False, True], ids=["cpu", "as-accelerator"])
@pytest.mark.parametrize("name", DETERMINISTIC_CASES)
def test_deterministic_algorithms(monkeypatch, name, as_accelerator):
    """Under ``torch.use_deterministic_algorithms(True)``: no error, bit-identical repeats, and no op that has no
    deterministic CUDA kernel in forward or backward (checked on the ops the accelerator code paths call)."""
    if as_accelerator:
        monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    loss_cls, kwargs = DETERMINISTIC_CASES[name]
    x, y = _case_inputs(loss_cls, kwargs)
    loss = loss_cls(**kwargs)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _OpRecorder() as recorder:
            first = _value_and_grad(loss, x, y)
        second = _value_and_grad(loss, x, y)
    finally:
        torch.use_deterministic_algorithms(before)
    if as_accelerator:  # the host path may count with CPU bincount, which is deterministic there
        refused = sorted(op for op in recorder.ops if any(k in op for k in _NO_DETERMINISTIC_CUDA_KERNEL))
        assert not refused, refused
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("name", DETERMINISTIC_CASES)
def test_accelerator_mode_loss_has_no_host_sync_and_matches_host_mode(monkeypatch, name):
    """What a GPU runs, on CPU (``_ops.HOST_DEVICES`` emptied: the always-shifted softmax, blocked class sums,
    device assertions): forward and backward read nothing back on the host, and equal the host path."""
    loss_cls, kwargs = DETERMINISTIC_CASES[name]
    x, y = _case_inputs(loss_cls, kwargs)
    loss = loss_cls(**kwargs)
    expected = _value_and_grad(loss, x, y)
    with monkeypatch.context() as m:
        m.setattr(_ops, "HOST_DEVICES", set())
        forbid_host_syncs(m)
        got = _value_and_grad(loss, x, y)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------------------------------
# 7. gradcheck
# --------------------------------------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "dice softmax label": (DicePlusLoss, dict(to_onehot_y=True, softmax=True), "label"),
    "dice sigmoid onehot": (DicePlusLoss, dict(sigmoid=True), "onehot"),
    "dice squared_pred": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, squared_pred=True), "label"),
    "dice jaccard batch": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, jaccard=True, batch=True), "label"),
    "dice ignore 255 + ce": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=255, lambda_ce=0.5,
                                                weight=[0.3, 0.6, 0.9]), "label"),  # fmt: skip
    "dice sigmoid bce": (DicePlusLoss, dict(sigmoid=True, lambda_ce=0.5, weight=[0.3, 0.6, 0.9]), "onehot"),
    "gdl square normalized": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True), "label"),
    "gdl square raw": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, normalize_weights=False), "label"),
    "gdl squared jaccard": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, squared_pred=True,
                                                          jaccard=True), "label"),  # fmt: skip
    "gdl ignore 2": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, ignore_index=2), "label"),
    "gdl sigmoid onehot + ce": (GeneralizedDicePlusLoss, dict(sigmoid=True, lambda_ce=0.5, w_type="simple"),
                                "onehot"),  # fmt: skip
    "dice focal label": (DiceFocalPlusLoss, dict(to_onehot_y=True, softmax=True, alpha=0.3, gamma=1.5), "label"),
    "dice focal softmax form": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, lambda_focal=1.0,
                                                   focal_softmax=True, focal_alpha=0.4), "label"),  # fmt: skip
    "gdl focal onehot": (GeneralizedDiceFocalPlusLoss, dict(sigmoid=True, weight=[0.2, 0.5, 0.9]), "onehot"),
    "tversky label": (TverskyPlusLoss, dict(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7), "label"),
}


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck(make_case, name):
    loss_cls, kwargs, target_kind = GRADCHECK_CASES[name]
    x, labels = make_case((2, 3, 3, 3), seed=4)
    labels = labels.clone()
    labels[0, 0, 0, 0] = 255 if kwargs.get("ignore_index") == 255 else labels[0, 0, 0, 0]
    y = _target(labels, 3, target_kind)
    loss = loss_cls(**kwargs)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x.detach().requires_grad_(True),))


# --------------------------------------------------------------------------------------------------------------------
# 9. property tests
# --------------------------------------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=25, deadline=None)


def _draw_case(seed: int, b: int, c: int, side: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(b, c, side, side, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (b, 1, side, side), generator=g)
    return x, labels


_loss_options = st.fixed_dictionaries(
    {
        "include_background": st.booleans(),
        "squared_pred": st.booleans(),
        "jaccard": st.booleans(),
        "batch": st.booleans(),
    }
)


def _make_loss(kind: str, opts: dict, **kw):
    if kind == "dice":
        return DicePlusLoss(**opts, **kw)
    return GeneralizedDicePlusLoss(**opts, **kw)


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    c=st.integers(2, 4),
    side=st.integers(2, 5),
    kind=st.sampled_from(["dice", "gdl"]),
    act=st.sampled_from(["softmax", "sigmoid"]),
    opts=_loss_options,
    w_type=st.sampled_from(["square", "simple", "uniform"]),
    normalize=st.booleans(),
)
def test_property_unit_interval(seed, b, c, side, kind, act, opts, w_type, normalize):
    x, labels = _draw_case(seed, b, c, side)
    extra = {} if kind == "dice" else {"w_type": w_type, "normalize_weights": normalize}
    value = _make_loss(kind, opts, to_onehot_y=True, reduction="none", **ACTS[act], **extra)(x, labels)
    assert torch.isfinite(value).all()
    assert (value >= 0).all() and (value <= 1).all()


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    c=st.integers(2, 4),
    side=st.integers(2, 5),
    kind=st.sampled_from(["dice", "gdl"]),
    opts=_loss_options,
)
def test_property_perfect_prediction_is_zero(seed, b, c, side, kind, opts):
    _, labels = _draw_case(seed, b, c, side)
    probs = R.one_hot(labels[:, 0], c)
    value = _make_loss(kind, opts, to_onehot_y=True, reduction="none")(probs, labels)
    torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-9, rtol=0)


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    c=st.integers(2, 4),
    side=st.integers(2, 5),
    kind=st.sampled_from(["dice", "gdl"]),
    perm_seed=st.integers(0, 1000),
    opts=st.fixed_dictionaries({"squared_pred": st.booleans(), "jaccard": st.booleans(), "batch": st.booleans()}),
)
def test_property_class_permutation_invariance(seed, b, c, side, kind, perm_seed, opts):
    x, labels = _draw_case(seed, b, c, side)
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(perm_seed))
    inverse = torch.argsort(perm)  # new channel j holds old channel perm[j], so old label k becomes inverse[k]
    loss = _make_loss(kind, opts, include_background=True, to_onehot_y=True, softmax=True)
    torch.testing.assert_close(loss(x[:, perm], inverse[labels]), loss(x, labels), atol=1e-10, rtol=1e-10)


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    c=st.integers(1, 4),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    kind=st.sampled_from(["dice", "gdl"]),
    act=st.sampled_from(["softmax", "sigmoid"]),
    lambda_ce=st.sampled_from([0.0, 1.0]),
    opts=_loss_options,
)
def test_property_finite_gradients(seed, c, scale, kind, act, lambda_ce, opts):
    x, labels = _draw_case(seed, 2, max(c, 2), 4, scale=scale)
    x = x[:, :c].detach().requires_grad_(True)
    if c == 1:
        y = (labels > 0).double()
        kw = {"sigmoid": True}
    else:
        y = labels
        kw = {"to_onehot_y": True, **ACTS[act]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one channel: include_background=False is ignored
        value = _make_loss(kind, opts, lambda_ce=lambda_ce, **kw)(x, y)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------------------------
# regressions found in review
# --------------------------------------------------------------------------------------------------------------------


def test_no_class_left_is_a_clear_error():
    x = torch.randn(1, 2, 4, 4)
    y = torch.randint(0, 2, (1, 1, 4, 4))
    with pytest.raises(ValueError, match="no class left to score.*include_background=False.*ignore_index"):
        DicePlusLoss(to_onehot_y=True, softmax=True, include_background=False, ignore_index=1)(x, y)


# --------------------------------------------------------------------------------------------------------------------
# MaskedDicePlusLoss: a region mask joins the ignore mask
# --------------------------------------------------------------------------------------------------------------------


def _masked_case(mask_batch: int = 2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 1, 6, 6, 6), generator=g)
    mask = (torch.rand(mask_batch, 1, 6, 6, 6, generator=g) > 0.3).double()
    onehot = torch.nn.functional.one_hot(y[:, 0], 3).permute(0, 4, 1, 2, 3).double()
    return x, y, onehot, mask


def _masked_value_and_grad(loss, x, *args):
    x = x.clone().requires_grad_(True)
    value = loss(x, *args)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@_MASKED_PARITY
@pytest.mark.parametrize("mask_batch", [2, 1])
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "kw", [{}, {"squared_pred": True}, {"jaccard": True}, {"batch": True}, {"reduction": "sum"}],
    ids=["plain", "squared", "jaccard", "batch", "sum"],
)  # fmt: skip
@pytest.mark.parametrize("include_background,label_map", [(True, False), (False, False), (False, True)])
def test_masked_dice_equals_monai(mask_batch, act, kw, include_background, label_map):
    """MONAI's MaskedDiceLoss, value and gradient, for one-hot targets and label maps without background."""
    x, y, onehot, mask = _masked_case(mask_batch)
    args = dict(include_background=include_background, to_onehot_y=label_map, **{act: True}, **kw)
    target = y if label_map else onehot
    ours = _masked_value_and_grad(MaskedDicePlusLoss(**args), x, target, mask)
    theirs = _masked_value_and_grad(ML.MaskedDiceLoss(**args), x, target, mask)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@_MASKED_PARITY
def test_masked_dice_departure_with_a_label_map_and_background():
    """MONAI multiplies the label map by the mask (masked voxels become background targets); ours leaves them out,
    which is MONAI's own value for the same target as one-hot."""
    x, y, onehot, mask = _masked_case()
    ours = MaskedDicePlusLoss(to_onehot_y=True, softmax=True)(x, y, mask)
    monai_onehot = ML.MaskedDiceLoss(softmax=True)(x, onehot, mask)
    monai_labels = ML.MaskedDiceLoss(to_onehot_y=True, softmax=True)(x, y, mask)
    torch.testing.assert_close(ours, monai_onehot)
    assert abs(float(ours - monai_labels)) > 1e-3


@pytest.mark.parametrize("fused", [True, False], ids=["fused route", "plain route"])
@pytest.mark.parametrize("kw", [{"lambda_ce": 1.0}, {"lambda_focal": 1.0, "ignore_index": 255}], ids=["ce", "focal"])
def test_masked_voxels_leave_every_sum(monkeypatch, fused, kw):
    """Logits under the mask's zeros change nothing and get no gradient, the CE/focal terms included; the mask
    behaves exactly as ignored labels do."""
    monkeypatch.setattr(_ops, "FUSED_ROUTE", fused)
    x, y, _, mask = _masked_case()
    loss = MaskedDicePlusLoss(to_onehot_y=True, softmax=True, include_background=False, **kw)
    value, grad = _masked_value_and_grad(loss, x, y, mask)
    moved = torch.where(mask.bool(), x, x + 5.0 * torch.randn_like(x))
    torch.testing.assert_close(_masked_value_and_grad(loss, moved, y, mask)[0], value)
    assert float(grad.masked_select(~mask.bool().expand_as(grad)).abs().max()) == 0.0
    ignored = torch.where(mask.bool(), y, 255)
    as_ignored = MaskedDicePlusLoss(to_onehot_y=True, softmax=True, include_background=False,
                                    **{**kw, "ignore_index": 255})(x, ignored)  # fmt: skip
    torch.testing.assert_close(as_ignored, value)


def test_masked_dice_without_a_mask_is_dice_plus():
    x, y, _, _ = _masked_case()
    args = dict(to_onehot_y=True, softmax=True, lambda_ce=1.0)
    assert torch.equal(MaskedDicePlusLoss(**args)(x, y), DicePlusLoss(**args)(x, y))


@pytest.mark.parametrize(
    "mask,match",
    [(torch.ones(2, 6, 6, 6), r"`mask` must have shape .*mask shape \(2, 6, 6, 6\) and input shape \(2, 3, 6, 6, 6\)"),
     (torch.ones(3, 1, 6, 6, 6), r"got mask shape \(3, 1, 6, 6, 6\)"),
     (torch.ones(2, 2, 6, 6, 6), r"got mask shape \(2, 2, 6, 6, 6\)"),
     (torch.full((2, 1, 6, 6, 6), 0.5), r"`mask` must be binary \(0/1\)")],
)  # fmt: skip
def test_masked_dice_bad_mask(mask, match):
    x, y, _, _ = _masked_case()
    with pytest.raises(ValueError, match=match):
        MaskedDicePlusLoss(to_onehot_y=True, softmax=True)(x, y, mask)


@pytest.mark.slow
def test_masked_dice_compiles_without_graph_breaks_and_keeps_the_custom_op():
    x, y, _, mask = _masked_case()
    x = x.float()
    loss = MaskedDicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=1.0)
    explained = torch._dynamo.explain(loss)(x, y, mask.float())
    assert explained.graph_break_count == 0
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(x, y, mask.float()), loss(x, y, mask.float()), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# GeneralizedWassersteinDicePlusLoss (parity grid GWDL_GRID in section 1, autocast rows in 1b; compile and device cases
# in COMPILE_CASES and DETERMINISTIC_CASES, section 6)
# --------------------------------------------------------------------------------------------------------------------


def test_gwdl_signature_is_monai_s():
    """MONAI's positional arguments, in order, with the same names and defaults; our extensions keyword-only."""
    theirs = [p for n, p in inspect.signature(ML.GeneralizedWassersteinDiceLoss.__init__).parameters.items()
              if n != "self"]  # fmt: skip
    ours = list(inspect.signature(GeneralizedWassersteinDicePlusLoss).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for mine, its in zip(ours, theirs, strict=False):
        default = its.default.value if hasattr(its.default, "value") else its.default
        assert (mine.default, mine.kind) == (default, inspect.Parameter.POSITIONAL_OR_KEYWORD), mine.name
    assert [p.name for p in ours[len(theirs):] if p.kind != inspect.Parameter.KEYWORD_ONLY] == []
    assert {p.name for p in ours[len(theirs):]} == {"batch", "ignore_index", "sync_batch", "validate"}


def test_gwdl_grid_varies_every_monai_argument():
    """Each MONAI argument takes at least two values across GWDL_GRID (smooth_nr/smooth_dr: the test below)."""
    seen: dict[str, set] = {}
    for row in GWDL_GRID:
        ours = _gwdl_case(*row)[0]
        values = {**dataclasses.asdict(ours.options), "dist_matrix": tuple(ours.dist_matrix.reshape(-1).tolist())}
        for name, value in values.items():
            seen.setdefault(name, set()).add(value)
    args = set(inspect.signature(ML.GeneralizedWassersteinDiceLoss.__init__).parameters) - {"self"}
    assert not {a for a in args - {"smooth_nr", "smooth_dr"} if len(seen.get(a, ())) < 2}


@pytest.mark.parametrize("smooth_nr,smooth_dr", [(0.0, 1e-3), (1e-2, 1e-2)])
@pytest.mark.parametrize("weighting_mode", ["default", "GDL"])
def test_gwdl_smoothing_and_matrix_forms_match_monai(make_case, parity_record, smooth_nr, smooth_dr, weighting_mode):
    """The smoothing constants, and the matrix as a float64 tensor, a numpy array and a max-1 matrix (kept as is)."""
    x, labels = make_case((2, 4, 3, 4, 5))
    for m in (torch.tensor(_BRATS_M, dtype=torch.float64) * 7, torch.tensor(_BRATS_M).numpy(), _BRATS_M):
        mm = torch.as_tensor(m)
        ours = GeneralizedWassersteinDicePlusLoss(m, weighting_mode, "none", smooth_nr, smooth_dr)
        theirs = _monai_gwdl(mm.numpy(), weighting_mode, "none", smooth_nr, smooth_dr)
        _assert_parity(parity_record, "GeneralizedWassersteinDiceLoss", ours, theirs, x, labels)


def test_gwdl_float32_parity_spot_check(make_case, parity_record):
    x, labels = make_case(SHAPES["3d"], dtype=torch.float32)
    for mode in ("default", "GDL"):
        ours = GeneralizedWassersteinDicePlusLoss(_BRATS_M, mode)
        theirs = _monai_gwdl(torch.tensor(_BRATS_M), mode)
        _assert_parity(parity_record, "float32 spot checks", ours, theirs, x, labels)


def test_gwdl_matches_the_per_voxel_formula(make_case):
    """Against the definition written voxel by voxel (Fidon et al. 2017, eq. 6 and the GWDS), not against MONAI."""
    x, labels = make_case((2, 3, 2, 3, 2), seed=2)
    m = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.8], [0.5, 0.8, 0.0]], dtype=torch.float64)
    p = torch.softmax(x.detach(), 1).reshape(2, 3, -1)
    y = labels.reshape(2, -1)
    for mode in ("default", "GDL"):
        expected = []
        for b in range(2):
            vol = [float((y[b] == k).sum()) for k in range(3)]
            alpha = [1.0 / (v + 1.0) for v in vol] if mode == "GDL" else [0.0, 1.0, 1.0]
            tp = den = err = 0.0
            for n in range(y.shape[1]):
                k = int(y[b, n])
                w = sum(float(m[k, c] * p[b, c, n]) for c in range(3))
                tp += alpha[k] * (1.0 - w)
                den += alpha[k] * (2.0 - w)
                err += w
            den = den if mode == "GDL" else 2.0 * tp + err
            expected.append(1.0 - (2.0 * tp + 1e-5) / (den + 1e-5))
        got = GeneralizedWassersteinDicePlusLoss(m, mode, "none")(x, labels)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [255, -1, 0, 2])
@pytest.mark.parametrize("weighting_mode", ["default", "GDL"])
def test_gwdl_ignore_index_equals_monai_on_the_cropped_volume(parity_record, ignore_index, weighting_mode):
    """Voxels labelled ``ignore_index`` leave every sum: the value and the other voxels' gradient are MONAI's on the
    volume without them; the ignored voxels get no gradient, whatever their logits (an in-range value: its voxels
    go, its channel stays in the softmax and the distances)."""
    x, labels = _make_case((2, 3, 6, 5, 4), seed=5)
    labels = labels.masked_fill(labels == ignore_index, 1) if 0 <= ignore_index < 3 else labels
    labels[:, :, :2] = ignore_index
    m = torch.tensor(_BRATS_M[:3]).T[:3].T.contiguous() * 2
    ours = GeneralizedWassersteinDicePlusLoss(m, weighting_mode, "none", ignore_index=ignore_index)
    theirs = _monai_gwdl(m, weighting_mode, "none")
    value, grad = _value_and_grad(ours, x, labels)
    crop_value, crop_grad = _value_and_grad(theirs, x[:, :, 2:], labels[:, :, 2:])
    torch.testing.assert_close(value, crop_value, atol=TOL, rtol=0)
    torch.testing.assert_close(grad[:, :, 2:], crop_grad, atol=TOL, rtol=0)
    assert float(grad[:, :, :2].abs().max()) == 0.0
    moved = x.detach().clone()
    moved[:, :, :2] += 3.0
    torch.testing.assert_close(ours(moved, labels), value)


@pytest.mark.parametrize("weighting_mode", ["default", "GDL"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gwdl_batch_equals_monai_on_the_batch_as_one_sample(make_case, parity_record, weighting_mode, reduction):
    """``batch=True`` sums over the batch before the ratio: MONAI's loss on the samples laid side by side as one
    (the GDL weights then come from the batch volumes); ``"none"`` gives a 0-d value."""
    x, labels = make_case(SHAPES["3d"])
    ours = GeneralizedWassersteinDicePlusLoss(_BRATS_M, weighting_mode, reduction, batch=True)
    theirs = _monai_gwdl(torch.tensor(_BRATS_M), weighting_mode, "none")

    def side_by_side(a, y):
        return theirs(torch.cat(a.unbind(0), -1)[None], torch.cat(y.unbind(0), -1)[None])[0]

    _assert_parity(parity_record, "GeneralizedWassersteinDiceLoss batch", ours, side_by_side, x, labels)
    assert ours(x, labels).ndim == 0
    per_sample = GeneralizedWassersteinDicePlusLoss(_BRATS_M, weighting_mode, "mean")(x, labels)
    batched = GeneralizedWassersteinDicePlusLoss(_BRATS_M, weighting_mode, "mean", batch=True)(x, labels)
    assert abs(float(per_sample.detach()) - float(batched.detach())) > 1e-4


def test_gwdl_dist_matrix_is_a_normalised_buffer_and_options_are_attributes():
    m = torch.tensor(_BRATS_M) * 4.0
    loss = GeneralizedWassersteinDicePlusLoss(m, "GDL", batch=True, ignore_index=255)
    assert "dist_matrix" in dict(loss.named_buffers()) and "dist_matrix" in loss.state_dict()
    torch.testing.assert_close(loss.dist_matrix, torch.tensor(_BRATS_M))
    assert m.max() == 4.0  # the caller's matrix is not changed
    assert loss.to(torch.float64).dist_matrix.dtype == torch.float64
    assert (loss.weighting_mode, loss.batch, loss.ignore_index, loss.reduction) == ("GDL", True, 255, "mean")
    assert repr(loss) == ("GeneralizedWassersteinDicePlusLoss(dist_matrix=<4x4>, weighting_mode='GDL', batch=True, "
                          "ignore_index=255)")  # fmt: skip
    x, labels = _make_case((2, 4, 3, 3, 3))
    before = loss.dist_matrix.clone()
    loss(x, labels)
    assert torch.equal(loss.dist_matrix, before)
    with pytest.raises(AttributeError, match="weighting_modee"):
        loss.weighting_modee  # noqa: B018


def test_gwdl_keeps_no_gathered_distance_map():
    """The autograd graph keeps no logits-sized tensor but the logits themselves (MONAI's keeps the gathered
    distances and the probabilities): saved tensors counted by size through ``saved_tensors_hooks``."""
    x, labels = _make_case((2, 5, 6, 6, 6), dtype=torch.float32)

    def logits_sized_saves(loss):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(x, labels)
        big = [t for t in saved if t.numel() * t.element_size() >= x.numel() * x.element_size()]
        return sum(1 for t in big if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())

    assert logits_sized_saves(GeneralizedWassersteinDicePlusLoss(torch.rand(5, 5), "GDL", ignore_index=4)) == 0
    assert logits_sized_saves(ML.GeneralizedWassersteinDiceLoss(torch.rand(5, 5), "GDL")) >= 2


def test_gwdl_finite_and_in_unit_interval_on_extreme_inputs():
    for scale in (0.0, 1e-3, 50.0, 1e4):
        x, labels = _make_case((2, 4, 4, 4, 4), seed=int(scale) % 7)
        for mode in ("default", "GDL"):
            value, grad = _value_and_grad(GeneralizedWassersteinDicePlusLoss(_BRATS_M, mode, "none"), x * scale, labels)
            assert torch.isfinite(value).all() and torch.isfinite(grad).all()
            assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0
    empty = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)  # background only: "default" has no true positive to find
    assert torch.isfinite(GeneralizedWassersteinDicePlusLoss(_BRATS_M)(torch.randn(1, 4, 4, 4, 4), empty))


def test_gwdl_metatensor_inputs():
    x, labels = _make_case((2, 4, 3, 3, 3))
    loss = GeneralizedWassersteinDicePlusLoss(_BRATS_M)
    torch.testing.assert_close(loss(MetaTensor(x), MetaTensor(labels)), loss(x, labels))


@pytest.mark.parametrize(
    "make,match",
    [(lambda: GeneralizedWassersteinDicePlusLoss(torch.ones(3, 4)),
      r"`dist_matrix` must be a square C x C matrix, got shape \(3, 4\)"),
     (lambda: GeneralizedWassersteinDicePlusLoss(torch.ones(3)), r"square C x C matrix, got shape \(3,\)"),
     (lambda: GeneralizedWassersteinDicePlusLoss(-torch.ones(3, 3)), r"`dist_matrix` must hold finite distances"),
     (lambda: GeneralizedWassersteinDicePlusLoss(torch.zeros(3, 3)), r"with a positive maximum"),
     (lambda: GeneralizedWassersteinDicePlusLoss(torch.full((3, 3), float("nan"))), r"finite distances"),
     (lambda: GeneralizedWassersteinDicePlusLoss(_BRATS_M, "gdl"),
      r"`weighting_mode` must be one of \('default', 'GDL'\), got 'gdl'. By 'gdl', did you mean 'GDL'"),
     (lambda: GeneralizedWassersteinDicePlusLoss(_BRATS_M, reduction="meen"), r"did you mean 'mean'"),
     (lambda: GeneralizedWassersteinDicePlusLoss(_BRATS_M, sync_batch=True), r"needs `batch=True`")],
)  # fmt: skip
def test_gwdl_constructor_errors_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_gwdl_constructor_type_errors():
    with pytest.raises(TypeError, match=r"GeneralizedWassersteinDicePlusLoss: .*missing a required argument"):
        GeneralizedWassersteinDicePlusLoss()
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'include_background'"):
        GeneralizedWassersteinDicePlusLoss(_BRATS_M, include_background=False)
    with pytest.raises(TypeError, match=r"`dist_matrix` must be a C x C tensor or array"):
        GeneralizedWassersteinDicePlusLoss("far")
    with pytest.raises(TypeError, match=r"`ignore_index` must be an int or None, got 2.5"):
        GeneralizedWassersteinDicePlusLoss(_BRATS_M, ignore_index=2.5)


@pytest.mark.parametrize(
    "shape,target,match",
    [((2, 3, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long),
      r"`dist_matrix` must be C x C for the C = 3 channels of `input`, got shape \(4, 4\)"),
     ((2, 4, 4, 4), torch.zeros(2, 4, 4, 4, dtype=torch.long),
      r"`target` must be a label map of shape \(B, \*spatial\) or \(B, 1, \*spatial\) matching `input`: got target "
      r"shape \(2, 4, 4, 4\) and input shape \(2, 4, 4, 4\)"),
     ((2, 4, 4, 4), torch.zeros(2, 1, 4, 5, dtype=torch.long), r"got target shape \(2, 1, 4, 5\)"),
     ((2, 4, 4, 4), torch.full((2, 4, 4), 4), r"`target` label values must lie in \[0, 4\), got \[4\]"),
     ((2, 4, 4, 4), torch.full((2, 4, 4), -1), r"`target` label values must lie in \[0, 4\), got \[-1\]"),
     ((2, 4, 4, 4), torch.full((2, 4, 4), 0.5), r"`target` label map must hold integer class indices")],
)  # fmt: skip
def test_gwdl_forward_errors_name_the_argument(shape, target, match):
    with pytest.raises(ValueError, match=match):
        GeneralizedWassersteinDicePlusLoss(_BRATS_M)(torch.randn(shape), target)


def test_gwdl_validate_scans_for_nan():
    x = torch.randn(1, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`input` contains NaN or Inf values"):
        GeneralizedWassersteinDicePlusLoss(_BRATS_M, validate=True)(x, torch.zeros(1, 3, 3, dtype=torch.long))


@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("weighting_mode,batch", [("default", False), ("GDL", True)])
def test_gwdl_meta_device_forward_backward(ignore_index, weighting_mode, batch):
    x = torch.empty(2, 4, 6, 6, 6, device="meta", requires_grad=True)
    y = torch.empty(2, 1, 6, 6, 6, dtype=torch.long, device="meta")
    loss = GeneralizedWassersteinDicePlusLoss(_BRATS_M, weighting_mode, batch=batch, ignore_index=ignore_index)
    value = loss.to("meta")(x, y)
    value.backward()
    assert value.device.type == "meta" and value.ndim == 0
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.device.type == "meta"


@pytest.mark.parametrize("kw", [{}, {"weighting_mode": "GDL"}, {"ignore_index": 255, "batch": True},
                                {"weighting_mode": "GDL", "ignore_index": 1, "reduction": "none"}])  # fmt: skip
def test_gwdl_gradcheck(kw):
    x, labels = _make_case((2, 4, 3, 3), seed=4)
    labels = labels.clone()
    labels[0, 0, 0, :2] = kw.get("ignore_index", labels[0, 0, 0, 0])
    loss = GeneralizedWassersteinDicePlusLoss(torch.tensor(_BRATS_M, dtype=torch.float64), **kw)
    assert torch.autograd.gradcheck(lambda t: loss(t, labels), (x.detach().requires_grad_(True),))
