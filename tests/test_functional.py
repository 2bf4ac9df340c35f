"""Tests of :mod:`monai_gdl_plus.functional` against ``tests/reference.py`` and closed forms; Modules included: the
CE and focal terms, ignore_index and half precision / autocast through the losses as well."""

from __future__ import annotations

import functools
import itertools
import warnings

import monai.losses as ML
import pytest
import reference as R
import torch
import torch.nn.functional as F
from cases import (
    SHAPES,
    _assert_matches_reference,
    _class_weight,
    _make_case,
    _target,
    _value_and_grad,
    _weight_for,
    _with_ignored,
)

from monai_gdl_plus import DicePlusLoss, GeneralizedDicePlusLoss, GeneralizedWassersteinDicePlusLoss, _ops
from monai_gdl_plus import functional as GF
from monai_gdl_plus.functional import soft_terms
from monai_gdl_plus.options import DiceOptions, WassersteinDiceOptions

pytestmark = pytest.mark.usefixtures("single_thread")


def _probs(case):
    x, labels = case
    return torch.softmax(x.detach(), 1), labels


# --------------------------------------------------------------------------------------------------------------------
# soft_terms (the plain route's sums) and per_class_terms (the route)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("target_form", ["onehot", "onehot_int", "label_b1", "label_b"])
@pytest.mark.parametrize("masked", [False, True])
def test_per_class_terms_match_reference(case, squared, target_form, masked):
    p, labels = _probs(case)
    b, c = p.shape[:2]
    onehot = R.one_hot(labels[:, 0], c)
    target = {
        "onehot": onehot,
        "onehot_int": onehot.long(),
        "label_b1": labels,
        "label_b": labels[:, 0],
    }[target_form]
    mask = None
    if masked:
        mask = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(7)) > 0.3).double()
    form = {"labels": target} if target_form.startswith("label") else {"target": target}
    terms, volumes = GF.soft_terms(p, **form, squared=squared, mask=mask)
    m = torch.ones(b, 1, p[0, 0].numel(), dtype=p.dtype) if mask is None else mask.reshape(b, 1, -1)
    expected = R.terms(p.reshape(b, c, -1) * m, onehot.reshape(b, c, -1) * m, squared)
    assert isinstance(terms, GF.DiceTerms)
    for got, want in zip(terms, expected, strict=False):
        assert got.shape == (b, c)
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(volumes, expected[2])  # binary targets: sum(g**2) = sum(g)


def test_soft_terms_need_exactly_one_target(case):
    p, labels = _probs(case)
    with pytest.raises(TypeError, match="exactly one of `labels` and `target`"):
        GF.soft_terms(p)
    with pytest.raises(TypeError, match="exactly one of `labels` and `target`"):
        GF.soft_terms(p, labels=labels, target=p)


def test_per_class_terms_soft_label_is_monai_soft_intersection(case):
    """MONAI's soft-label form ``I = (|p| + |g| - |p - g|) / 2`` is the sum of min(p, g) for non-negative inputs."""
    p, _ = _probs(case)
    b, c = p.shape[:2]
    g = torch.softmax(torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=p.dtype), 1)
    terms, _ = GF.soft_terms(p, target=g, soft_label=True)
    for i, k in itertools.product(range(b), range(c)):
        assert float(terms.intersection[i, k]) == pytest.approx(float(torch.minimum(p[i, k], g[i, k]).sum()))
        assert float(terms.pred_sum[i, k]) == pytest.approx(float(p[i, k].sum()))
        assert float(terms.target_sum[i, k]) == pytest.approx(float(g[i, k].sum()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_class_terms_half_inputs_give_float32(case, dtype):
    p, labels = _probs(case)
    terms, _ = GF.soft_terms(p.to(dtype), labels=labels)
    expected, _ = GF.soft_terms(p.to(dtype).float(), labels=labels)
    for got, want in zip(terms, expected, strict=False):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


def test_per_class_terms_gradient_matches_reference(case):
    x, labels = case
    c = x.shape[1]

    def ours(t):
        terms, _ = GF.soft_terms(torch.softmax(t, 1), labels=labels, squared=True)
        return sum((k + 1) * term.sum() for k, term in enumerate(terms))

    def ref(t):
        b = t.shape[0]
        onehot = R.one_hot(labels[:, 0], c).reshape(b, c, -1)
        terms = R.terms(torch.softmax(t, 1).reshape(b, c, -1), onehot, True)
        return sum((k + 1) * term.sum() for k, term in enumerate(terms))

    (g1,) = torch.autograd.grad(ours(x), x)
    (g2,) = torch.autograd.grad(ref(x), x)
    torch.testing.assert_close(g1, g2)


# --------------------------------------------------------------------------------------------------------------------
# label_terms
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [None, 255, -1, 1])
def test_label_terms_match_reference(case, ignore_index):
    x, labels = case
    c = x.shape[1]
    pred = x.detach().argmax(1)
    target = labels[:, 0].clone()
    if ignore_index is not None and not 0 <= ignore_index < c:
        target[:, :2] = ignore_index
    terms = GF.label_terms(pred, target, c, ignore_index=ignore_index)
    expected = R.label_counts(pred, target, c, ignore_index)
    for got, want in zip(terms, expected, strict=False):
        assert got.dtype == torch.int64
        torch.testing.assert_close(got, want)


def test_label_terms_errors():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 4\).*\(2, 5\)"):
        GF.label_terms(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        GF.label_terms(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 3), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        GF.label_terms(torch.full((2, 4), 5), torch.zeros(2, 4, dtype=torch.long), 3)


# --------------------------------------------------------------------------------------------------------------------
# dice_from_terms, gdl_weights, generalized_dice_from_terms
# --------------------------------------------------------------------------------------------------------------------


def _dice_loss_of(p, g, smooth=(0.0, 0.0), jaccard=False):
    """dice_from_terms of the terms of one class: prediction ``p`` and target ``g`` as flat lists, shape (1, 1)."""
    probs = torch.tensor(p, dtype=torch.float64).reshape(1, 1, -1)
    target = torch.tensor(g, dtype=torch.float64).reshape(1, 1, -1)
    return GF.dice_from_terms(GF.soft_terms(probs, target=target)[0], *smooth, jaccard=jaccard)


def _binary_masks(seed, n=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < 0.4).tolist(), (torch.rand(n, generator=g) < 0.5).tolist()


@pytest.mark.parametrize("jaccard", [False, True])
def test_dice_from_terms_closed_forms(jaccard):
    """Values known without the formula under test: perfect overlap 0, disjoint 1, half overlap, set sizes."""
    assert float(_dice_loss_of([1, 1, 0, 1], [1, 1, 0, 1], jaccard=jaccard)) == 0.0
    assert float(_dice_loss_of([1, 1, 0, 0], [0, 0, 1, 1], jaccard=jaccard)) == 1.0
    # A = {0, 1}, B = {1, 2}: Dice = 2|A & B| / (|A| + |B|) = 1/2, IoU = |A & B| / |A | B| = 1/3
    half = float(_dice_loss_of([1, 1, 0, 0], [0, 1, 1, 0], jaccard=jaccard))
    assert half == pytest.approx(1 - 1 / 3 if jaccard else 1 - 1 / 2, rel=1e-15)
    for seed in range(5):  # random binary masks: Dice and IoU from Python sets
        pm, gm = _binary_masks(seed)
        a = {i for i, v in enumerate(pm) if v}
        b = {i for i, v in enumerate(gm) if v}
        score = len(a & b) / len(a | b) if jaccard else 2 * len(a & b) / (len(a) + len(b))
        assert float(_dice_loss_of(pm, gm, jaccard=jaccard)) == pytest.approx(1 - score, rel=1e-12)


def test_dice_from_terms_soft_worked_example_and_jaccard_identity():
    """p = [0.7, 0], g = [1, 1]: soft Dice score 2 * 0.7 / (0.7 + 2); the Jaccard score is D / (2 - D)."""
    dice = 1 - float(_dice_loss_of([0.7, 0.0], [1.0, 1.0]))
    assert dice == pytest.approx(2 * 0.7 / (0.7 + 2), rel=1e-15)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):  # soft predictions against binary targets, and soft against soft
        p = torch.rand(50, generator=g, dtype=torch.float64)
        t = (torch.rand(50, generator=g, dtype=torch.float64) < 0.5).double()
        for target in (t, torch.rand(50, generator=g, dtype=torch.float64)):
            d = 1 - float(_dice_loss_of(p.tolist(), target.tolist()))
            j = 1 - float(_dice_loss_of(p.tolist(), target.tolist(), jaccard=True))
            assert 0 < j < d < 1
            assert j == pytest.approx(d / (2 - d), rel=1e-12)


@pytest.mark.parametrize("jaccard", [False, True])
def test_dice_from_terms_smoothing(jaccard):
    """An empty class (I = P = G = 0) scores ``1 - smooth_nr / smooth_dr``; smoothing pulls a disjoint pair below 1."""
    empty = GF.DiceTerms(*(torch.zeros(1, 3, dtype=torch.float64) for _ in range(3)))
    for (nr, dr), expected in (((1e-5, 1e-5), 0.0), ((0.0, 1e-6), 1.0), ((1.0, 2.0), 0.5), ((1.0, 1.0), 0.0)):
        f = GF.dice_from_terms(empty, nr, dr, jaccard=jaccard)
        assert f.shape == (1, 3) and torch.isfinite(f).all()
        assert f.tolist() == [[pytest.approx(expected, abs=1e-15)] * 3]
    # disjoint: I = 0, P = 1, G = 2 (D = 3, Jaccard denominator 2 * (D - I) = 6): 1 - s / (3 + s) or 1 - s / (6 + s)
    disjoint = _dice_loss_of([1, 0, 0], [0, 1, 1], (1.0, 1.0), jaccard)
    assert float(disjoint) == pytest.approx(1 - 1 / (6 + 1) if jaccard else 1 - 1 / (3 + 1), rel=1e-15)
    # and the numerator smoothing alone lifts the score of a perfect pair above 1 (loss below 0): 1 - (2 + 1) / 2
    assert float(_dice_loss_of([1], [1], (1.0, 0.0), jaccard)) == pytest.approx(-0.5, rel=1e-15)


GDL_WEIGHT_VOLUMES = [[5.0, 0.0, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [100.0, 2.0, 0.0], [7.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "w_type,absent_weight,static,normalize",
    list(itertools.product(("square", "simple", "uniform"), ("max", "zero", 0.25), (None, [0.5, 1.0, 0.2]),
                           (True, False))),
)  # fmt: skip
def test_gdl_weights_match_reference(w_type, absent_weight, static, normalize):
    vols = torch.tensor(GDL_WEIGHT_VOLUMES, dtype=torch.float64, requires_grad=True)
    static_t = None if static is None else torch.tensor(static)
    w = GF.gdl_weights(vols, w_type, absent_weight, static_t, normalize)
    assert w.shape == vols.shape and not w.requires_grad  # weights carry no gradient
    for row, got in zip(GDL_WEIGHT_VOLUMES, w, strict=False):
        want = R.gdl_weights(row, w_type, absent_weight, static, normalize)
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64))
    # 1-D volumes (batch-summed) follow the same rules
    one = GF.gdl_weights(vols[3].detach(), w_type, absent_weight, static_t, normalize)
    torch.testing.assert_close(one, w[3])


def test_gdl_weights_empty_sample_is_uniform_whatever_the_policy():
    zero = torch.zeros(1, 4)
    for policy in ("max", "zero", 3.0):
        normalized = GF.gdl_weights(zero, "square", policy, normalize=True)
        torch.testing.assert_close(normalized.float(), torch.full((1, 4), 0.25))
        torch.testing.assert_close(GF.gdl_weights(zero, "square", policy, normalize=False).float(), torch.ones(1, 4))


@pytest.mark.parametrize("jaccard", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_generalized_dice_from_terms_formula(jaccard, normalize):
    g = torch.Generator().manual_seed(2)
    inter = torch.rand(2, 3, generator=g, dtype=torch.float64) * 4
    psum = inter + torch.rand(2, 3, generator=g, dtype=torch.float64)
    vol = torch.tensor([[4.0, 0.0, 6.0], [3.0, 5.0, 9.0]], dtype=torch.float64)
    tsum = vol.clone()
    f = GF.generalized_dice_from_terms(
        GF.DiceTerms(inter, psum, tsum), vol, w_type="simple", normalize_weights=normalize, jaccard=jaccard
    )
    assert f.shape == (2,)
    for i in range(2):
        w = R.gdl_weights(vol[i].tolist(), "simple", "max", None, normalize)
        num = sum(w[k] * float(inter[i, k]) for k in range(3))
        den = sum(w[k] * float(psum[i, k] + tsum[i, k]) for k in range(3))
        den = 2 * (den - num) if jaccard else den
        assert float(f[i]) == pytest.approx(1 - (2 * num + 1e-5) / (den + 1e-5), rel=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# reduce_loss, check_option, prepare
# --------------------------------------------------------------------------------------------------------------------


def test_reduce_loss():
    f = torch.arange(6.0).reshape(2, 3)
    assert float(GF.reduce_loss(f, "mean")) == pytest.approx(2.5)
    assert float(GF.reduce_loss(f, "sum")) == pytest.approx(15.0)
    assert GF.reduce_loss(f, "none") is f


@pytest.mark.parametrize(
    "include_background,ignore_index,keep", [(True, None, (0, 1, 2, 3)), (False, None, (1, 2, 3)),
                                             (False, 2, (1, 3)), (True, 255, (0, 1, 2, 3))]
)  # fmt: skip
def test_prepare_label_map(make_case, include_background, ignore_index, keep):
    x, labels = make_case((2, 4, 5, 5))
    labels = labels.clone()
    labels[0, 0, 0, :] = 255 if ignore_index == 255 else labels[0, 0, 0, :]
    options = DiceOptions(include_background=include_background, to_onehot_y=True, softmax=True,
                          ignore_index=ignore_index)  # fmt: skip
    prep = GF.prepare(x, labels, options)
    assert prep.keep == keep
    assert prep.target is None and prep.labels.shape == (2, 25)
    assert torch.equal(prep.logits, x.reshape(2, 4, 25))  # a view of the logits, not activated
    if ignore_index is None:
        assert prep.mask is None
    else:
        flat = labels.reshape(2, 25)
        torch.testing.assert_close(prep.mask, (flat != ignore_index).to(prep.mask.dtype))
        assert ((prep.labels >= 0) & (prep.labels < 4)).all()  # ignored voxels mapped into range


# --------------------------------------------------------------------------------------------------------------------
# the loss functions and the Modules against the reference
# --------------------------------------------------------------------------------------------------------------------

FUNCTION_CASES = [
    {"to_onehot_y": True, "softmax": True},
    {"to_onehot_y": True, "softmax": True, "include_background": False, "batch": True, "squared_pred": True},
    {"to_onehot_y": True, "sigmoid": True, "jaccard": True, "reduction": "sum", "weight": 0.5},
    {"to_onehot_y": True, "softmax": True, "ignore_index": 255, "lambda_ce": 0.5, "weight": [0.2, 0.4, 0.6, 0.8]},
    {"to_onehot_y": True, "softmax": True, "ignore_index": 2, "lambda_dice": 0.3, "lambda_ce": 0.7,
     "label_smoothing": 0.1},
    {"softmax": True, "reduction": "none", "include_background": False, "weight": [0.5, 0.6, 0.7]},
    {"sigmoid": True, "lambda_ce": 1.0},
]  # fmt: skip
GDL_ONLY = [{}, {"w_type": "simple", "absent_weight": "zero"}, {"w_type": "uniform", "normalize_weights": False},
            {"absent_weight": 0.1, "batch": True}]  # fmt: skip


MODULE_CASES = [("dice", kw) for kw in FUNCTION_CASES] + [
    ("gdl", {**kw, **extra}) for kw, extra in itertools.product(FUNCTION_CASES, GDL_ONLY)
]


def _smoothed_ce(x, labels, ignore_index, eps):
    """Mean label-smoothed CE over the voxels whose label is not ``ignore_index``, from log-softmax by hand:
    ``(1 - eps) * -log p_y + eps * mean_c(-log p_c)``."""
    b, c = x.shape[:2]
    logp = torch.log_softmax(x.double().reshape(b, c, -1), 1)
    y = labels.reshape(b, -1)
    keep = y != ignore_index
    nll = -logp.gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
    per_voxel = (1 - eps) * nll - eps * logp.mean(1)
    return per_voxel[keep].sum() / keep.sum()


def _reference_loss(kind, x, y, kw):
    """tests/reference.py's loss for ``kw``; label smoothing (not in the reference) through :func:`_smoothed_ce`."""
    kw = dict(kw)
    eps = kw.pop("label_smoothing", 0.0)
    lambda_ce = kw.get("lambda_ce", 0.0)
    if eps:
        kw["lambda_ce"] = 0.0
    ref = (R.dice_loss if kind == "dice" else R.generalized_dice_loss)(x, y, **kw)
    if eps:
        ref = ref + lambda_ce * _smoothed_ce(x, y, kw.get("ignore_index"), eps)
    return ref


@pytest.mark.parametrize("kind,kw", MODULE_CASES)
def test_module_and_function_match_the_reference(make_case, kind, kw):
    """Module and function against the per-class loop reference (value and gradient), not against each other."""
    x, labels = make_case((2, 4, 5, 5, 5))
    labels = labels.clone()
    if kw.get("ignore_index") == 255:
        labels[:, :, 0] = 255
    y = labels if kw.get("to_onehot_y") else R.one_hot(labels[:, 0], 4)
    if kind == "dice":
        module, function = DicePlusLoss(**kw), GF.dice_plus_loss
    else:
        module, function = GeneralizedDicePlusLoss(**kw), GF.generalized_dice_plus_loss
    xr = x.detach().clone().requires_grad_(True)
    expected = _reference_loss(kind, xr, y, kw)
    (expected_grad,) = torch.autograd.grad(expected.sum(), xr)
    # static weights are kept in float32 (as MONAI's), the reference's in float64
    tol = {"rtol": 2e-7, "atol": 1e-10} if "weight" in kw else {"rtol": 1e-10, "atol": 1e-12}
    for loss in (module, functools.partial(function, **kw)):
        xi = x.detach().clone().requires_grad_(True)
        value = loss(xi, y)
        assert value.shape == expected.shape
        torch.testing.assert_close(value, expected, **tol)
        (grad,) = torch.autograd.grad(value.sum(), xi)
        torch.testing.assert_close(grad, expected_grad, **tol)


@pytest.mark.parametrize("function", [GF.dice_plus_loss, GF.generalized_dice_plus_loss])
def test_functions_validate_arguments(function):
    x = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 1, 4, 4))
    with pytest.raises(ValueError, match="did you mean 'mean'"):
        function(x, y, to_onehot_y=True, reduction="meen")
    with pytest.raises(ValueError, match="mutually exclusive"):
        function(x, y, sigmoid=True, softmax=True)
    with pytest.raises(ValueError, match=r"`weight`.*no less than 0"):
        function(x, y, to_onehot_y=True, weight=[1.0, -1.0, 1.0])


def test_gdl_function_rejects_unknown_w_type():
    with pytest.raises(ValueError, match="did you mean 'square'"):
        GF.generalized_dice_plus_loss(torch.randn(1, 2, 3, 3), torch.zeros(1, 1, 3, 3), w_type="squar")


# --------------------------------------------------------------------------------------------------------------------
# the CE and focal terms and ignore_index, through the losses, against the reference and torch
# --------------------------------------------------------------------------------------------------------------------


WEIGHT_IGNORE_GRID = [
    combo
    for combo in itertools.product(("dice", "gdl"), (True, False), ("label", "onehot"), (None, "short", "full"),
                                   (None, 255, -1, 2, 0), (0.0, 0.5))  # fmt: skip
    if not (combo[3] == "short" and combo[1])  # length C-1 exists only without background
]


@pytest.mark.parametrize("loss_name,include_background,target_kind,weight,ignore_index,lambda_ce", WEIGHT_IGNORE_GRID)
def test_weight_ignore_index_and_ce_match_reference(
    make_case, loss_name, include_background, target_kind, weight, ignore_index, lambda_ce
):
    """Static weights (both lengths), ignore_index outside and inside [0, C) (channel dropped), Dice/GDL + CE."""
    x, labels = make_case(SHAPES["2d"])
    c = x.shape[1]
    if ignore_index is not None and not 0 <= ignore_index < c:
        labels = _with_ignored(labels, ignore_index)
    y = _target(labels, c, target_kind)
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", softmax=True,
              weight=_weight_for(weight, c), ignore_index=ignore_index,
              lambda_ce=lambda_ce)  # fmt: skip
    cls, fn = (DicePlusLoss, R.dice_loss) if loss_name == "dice" else (GeneralizedDicePlusLoss, R.generalized_dice_loss)

    def ref(a, b):
        return fn(a, b, **kw)

    _assert_matches_reference(cls(**kw), ref, x, y)


@pytest.mark.parametrize("loss_name", ["dice", "gdl"])
@pytest.mark.parametrize("ignore_index", [255, -1, 2])
def test_sigmoid_ce_is_per_channel_bce_matching_reference(make_case, loss_name, ignore_index):
    """Departure: sigmoid with C > 1 and lambda_ce > 0 gives per-channel BCE (pos_weight = class weight)."""
    x, labels = make_case(SHAPES["2d"])
    if not 0 <= ignore_index < x.shape[1]:
        labels = _with_ignored(labels, ignore_index)
    kw = dict(to_onehot_y=True, sigmoid=True, ignore_index=ignore_index, lambda_ce=0.8, weight=_class_weight(3))
    cls, fn = (DicePlusLoss, R.dice_loss) if loss_name == "dice" else (GeneralizedDicePlusLoss, R.generalized_dice_loss)

    def ref(a, b):
        return fn(a, b, **kw)

    _assert_matches_reference(cls(**kw), ref, x, labels)


@pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])
@pytest.mark.parametrize("ignore_index", [255, -1, 2])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_lambda_ce_is_dice_plus_torch_cross_entropy(make_case, loss_cls, ignore_index, label_smoothing):
    x, labels = make_case(SHAPES["3d"])
    if not 0 <= ignore_index < x.shape[1]:
        labels = _with_ignored(labels, ignore_index)
    w = _class_weight(x.shape[1])
    kw = dict(to_onehot_y=True, softmax=True, ignore_index=ignore_index, weight=w)
    lam = 0.7
    combined = loss_cls(lambda_ce=lam, label_smoothing=label_smoothing, **kw)(x, labels)
    dice = loss_cls(**kw)(x, labels)
    ce = F.cross_entropy(x, labels[:, 0], weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing)
    torch.testing.assert_close(combined, dice + lam * ce)
    # lambda_dice scales the Dice part only
    scaled = loss_cls(lambda_dice=0.25, lambda_ce=lam, label_smoothing=label_smoothing, **kw)(x, labels)
    torch.testing.assert_close(scaled, 0.25 * dice + lam * ce)


@pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])
def test_sigmoid_ce_is_bce_with_logits(make_case, loss_cls):
    x, labels = make_case(SHAPES["2d"])
    y = R.one_hot(labels[:, 0], 3)
    w = _class_weight(3)
    combined = loss_cls(sigmoid=True, lambda_ce=0.5, weight=w)(x, y)
    dice = loss_cls(sigmoid=True, weight=w)(x, y)
    bce = F.binary_cross_entropy_with_logits(x, y, pos_weight=w.reshape(3, 1, 1))
    torch.testing.assert_close(combined, dice + 0.5 * bce)
    if loss_cls is DicePlusLoss:  # departure: MONAI's DiceCELoss takes softmax CE here
        monai_value = ML.DiceCELoss(sigmoid=True, lambda_ce=0.5, weight=w)(x, y)
        assert abs(float(monai_value.detach()) - float(combined.detach())) > 1e-3


FOCAL_EXT_GRID = list(
    itertools.product(("dice", "gdl"), (True, False), ("label", "onehot"), (None, 255, 2), ((2.0, None), (1.0, 0.3)),
                      (False, True), (None, "full"), ("mean", "sum"))
)  # fmt: skip


@pytest.mark.parametrize(
    "loss_name,include_background,target_kind,ignore_index,focal,focal_softmax,weight,reduction", FOCAL_EXT_GRID
)
def test_focal_term_matches_lin_et_al_reference(
    loss_name, include_background, target_kind, ignore_index, focal, focal_softmax, weight, reduction
):
    """The focal term against Lin et al.'s ``-alpha_t (1 - p_t)**gamma log p_t`` element by element: both forms,
    ignored voxels left out of the sums and of the count, an in-range ignore_index channel dropped, class weights,
    both reductions, with Dice/GDL and CE beside it."""
    x, labels = _make_case((2, 3, 4, 4, 3))
    c = x.shape[1]
    labels = _with_ignored(labels, 255) if ignore_index == 255 else labels
    gamma, alpha = focal
    kw = dict(include_background=include_background, to_onehot_y=target_kind == "label", softmax=True,
              ignore_index=ignore_index, weight=_weight_for(weight, c), lambda_focal=0.8, gamma=gamma,
              focal_alpha=alpha, focal_softmax=focal_softmax, reduction=reduction,
              lambda_ce=0.4 if reduction == "mean" else 0.0)  # fmt: skip  (the reference's CE is a mean)
    cls, fn = (DicePlusLoss, R.dice_loss) if loss_name == "dice" else (GeneralizedDicePlusLoss, R.generalized_dice_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the softmax form's "alpha ignored without background", as MONAI warns

        def ref(a, b):
            kw_ref = dict(kw, focal_alpha=None) if focal_softmax and alpha and not include_background else kw
            return fn(a, b, **{k: v for k, v in kw_ref.items() if k != "label_smoothing"})

        _assert_matches_reference(cls(**kw), ref, x, _target(labels, c, target_kind))


def test_focal_softmax_form_matches_monai_focal_loss_with_background(make_case):
    """The softmax form equals MONAI's ``FocalLoss(use_softmax=True)`` where both take the softmax over all channels
    (with the background kept; without it MONAI renormalises over the foreground channels, we keep the Dice term's
    probabilities)."""
    x, labels = make_case(SHAPES["3d"])
    for alpha in (None, 0.25):
        ours = DicePlusLoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_focal=1.0, focal_softmax=True,
                            focal_alpha=alpha)  # fmt: skip
        theirs = ML.FocalLoss(to_onehot_y=True, use_softmax=True, alpha=alpha)
        a, ga = _value_and_grad(ours, x, labels)
        b, gb = _value_and_grad(theirs, x, labels)
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-6, rtol=0)  # MONAI's FocalLoss computes in float32
        torch.testing.assert_close(ga, gb.to(ga.dtype), atol=1e-7, rtol=0)


@pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])
@pytest.mark.parametrize("ignore_index", [255, -1])
@pytest.mark.parametrize("lambda_ce", [0.0, 0.5])
@pytest.mark.parametrize("batch", [False, True])
def test_ignore_index_outside_range_equals_removing_the_voxels(make_case, loss_cls, ignore_index, lambda_ce, batch):
    """The same voxels ignored in every sample: flatten to (B, C, N), drop those columns, no ignore_index."""
    x, labels = make_case(SHAPES["3d"])
    b, c = x.shape[:2]
    ignored = torch.rand(labels.shape[2:], generator=torch.Generator().manual_seed(5)) < 0.3
    labels = labels.clone()
    labels[:, :, ignored] = ignore_index
    kw = dict(to_onehot_y=True, softmax=True, batch=batch, lambda_ce=lambda_ce)
    with_ignore = loss_cls(ignore_index=ignore_index, **kw)(x, labels)
    keep = ~ignored.reshape(-1)
    removed = loss_cls(**kw)(x.reshape(b, c, -1)[:, :, keep], labels.reshape(b, 1, -1)[:, :, keep])
    torch.testing.assert_close(with_ignore, removed)
    assert keep.sum() < keep.numel()  # something was actually removed


@pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])
@pytest.mark.parametrize("include_background", [True, False])
def test_ignore_index_inside_range_equals_removing_voxels_and_channel(make_case, loss_cls, include_background):
    """ignore_index=2: its voxels are removed and channel 2 is dropped after the softmax."""
    x, labels = make_case(SHAPES["3d"])
    b, c = x.shape[:2]
    kw = dict(include_background=include_background, reduction="sum")
    with_ignore = loss_cls(to_onehot_y=True, softmax=True, ignore_index=2, **kw)(x, labels)
    p = torch.softmax(x, 1).reshape(b, c, -1)
    flat = labels.reshape(b, 1, -1)
    keep_ch = [k for k in range(c) if k != 2]
    relabel = torch.tensor([0, 1, -1, 2])  # class 3 becomes channel 2
    parts = []
    for i in range(b):  # the ignored set differs per sample: one sample at a time
        keep = flat[i, 0] != 2
        pi = p[i : i + 1][:, keep_ch][:, :, keep]
        yi = relabel[flat[i : i + 1][:, :, keep]]
        parts.append(loss_cls(to_onehot_y=True, **kw)(pi, yi))
    torch.testing.assert_close(with_ignore, sum(parts))


# --------------------------------------------------------------------------------------------------------------------
# half precision and autocast: sums in float32 or wider
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target_kind", ["label", "onehot"])
def test_half_precision_inputs_accumulate_in_float32(make_case, loss_cls, dtype, target_kind):
    x64, labels = make_case(SHAPES["3d"])
    x32 = x64.detach().float()
    low = x32.to(dtype).requires_grad_(True)
    y = _target(labels, 4, target_kind).to(dtype) if target_kind == "onehot" else labels
    kw = dict(to_onehot_y=target_kind == "label", softmax=True, squared_pred=True, ignore_index=None)
    loss = loss_cls(**kw)
    value = loss(low, y)
    value.backward()
    assert value.dtype == torch.float32
    assert low.grad.dtype == dtype and torch.isfinite(low.grad).all()
    # the same numbers given as float32: float32-accurate
    same_numbers = loss(low.detach().float(), y.float() if target_kind == "onehot" else y)
    torch.testing.assert_close(value, same_numbers, atol=1e-6, rtol=0)
    # and close to the unrounded float32 input
    tol = 2e-2 if dtype is torch.bfloat16 else 2e-3
    torch.testing.assert_close(value, loss(x32, y.float() if target_kind == "onehot" else y), atol=tol, rtol=0)


def _probabilities(t: torch.Tensor) -> torch.Tensor:
    return torch.softmax(t.float(), 1)


# per-class soft volumes of (1, 2, 64^3) are ~131,000 voxels: twice float16's largest finite value
OVERFLOW_CASES = {
    "dice softmax": (DicePlusLoss, dict(to_onehot_y=True, softmax=True), "label"),
    "dice softmax onehot": (DicePlusLoss, dict(softmax=True), "onehot"),
    "dice sigmoid squared": (DicePlusLoss, dict(to_onehot_y=True, sigmoid=True, squared_pred=True), "label"),
    "dice+ce": (DicePlusLoss, dict(to_onehot_y=True, softmax=True, lambda_ce=1.0, weight=[0.4, 1.0]), "label"),
    "gdl raw": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, normalize_weights=False), "label"),
    "gdl + ce": (GeneralizedDicePlusLoss, dict(to_onehot_y=True, softmax=True, lambda_ce=0.5), "label"),
    "probabilities ignore 255 (plain path)": (DicePlusLoss, dict(to_onehot_y=True, other_act=_probabilities,
                                                                 ignore_index=255), "label"),  # fmt: skip
    "gdl probabilities ignore 255 (plain path)": (GeneralizedDicePlusLoss, dict(
        to_onehot_y=True, other_act=_probabilities, ignore_index=255, w_type="simple"), "label"),  # fmt: skip
    "gwdl": (GeneralizedWassersteinDicePlusLoss, dict(dist_matrix=[[0.0, 1.0], [1.0, 0.0]]), "label"),
    "gwdl GDL ignore 255": (GeneralizedWassersteinDicePlusLoss, dict(dist_matrix=[[0.0, 1.0], [1.0, 0.0]],
                                                                     weighting_mode="GDL", ignore_index=255), "label"),
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", OVERFLOW_CASES)
def test_autocast_with_class_volumes_past_float16_range(name, dtype):
    """The issue's case: (1, 2, 64^3) under CPU autocast gave Dice 1.0 and a NaN GDL gradient (bmm sums in float16).
    Value and gradient now equal the float32 loss on the rounded logits, with logits in float32 or in ``dtype``."""
    loss_cls, kw, target_kind = OVERFLOW_CASES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, 64, 64, generator=g)
    labels = _with_ignored(torch.randint(0, 2, (1, 1, 64, 64, 64), generator=g), 255, fraction=0.1)
    labels = labels if "255" in name else labels.clamp_max(1)
    y = labels if target_kind == "label" else R.one_hot(labels[:, 0], 2, torch.float32)
    loss = loss_cls(**kw)
    for logits in (x, x.to(dtype)):
        expected, expected_grad = _value_and_grad(loss, logits.float(), y)
        assert 0.0 < float(expected) < 1.5
        with torch.autocast("cpu", dtype=dtype):
            value, grad = _value_and_grad(loss, logits, y)
        assert abs(float(value) - float(expected)) <= 1e-6, (float(value), float(expected))
        assert grad.dtype == logits.dtype and torch.isfinite(grad).all()
        # float32 logits: float32's gradient; half logits: that gradient rounded to their dtype (within one unit;
        # float16 gradients of ~1e-6 are subnormal, hence the absolute term)
        fin = torch.finfo(logits.dtype)
        atol = 1e-6 * float(expected_grad.abs().max()) if logits.dtype == torch.float32 else 2 * fin.tiny * fin.eps
        torch.testing.assert_close(grad, expected_grad.to(logits.dtype), rtol=max(fin.eps, 1e-5), atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_ce_with_weight_over_65504_voxels(dtype):
    """fp16/bf16 logits: CE weights and counts are summed in float32 (an fp16 sum overflows past 65504 voxels)."""
    torch.manual_seed(3)
    x32 = torch.randn(2, 3, 48, 48, 48)
    y = torch.randint(0, 3, (2, 1, 48, 48, 48))
    kw = dict(to_onehot_y=True, softmax=True, lambda_ce=1.0, weight=[0.1, 0.7, 1.3])
    x16 = x32.to(dtype).requires_grad_(True)
    value = DicePlusLoss(**kw)(x16, y)
    value.backward()
    expected = DicePlusLoss(**kw)(x16.detach().float(), y)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert float(x16.grad.float().abs().max()) > 0


@pytest.mark.slow
def test_class_volume_counts_exactly_past_2_pow_24_voxels():
    """Target volumes are counted in float64: a float32 scatter of ones stops at 16,777,216."""
    n = 2**24 + 2**20
    labels = torch.zeros(1, 1, n, dtype=torch.long)
    labels[0, 0, :1000] = 1
    x = torch.zeros(1, 2, n)
    terms, _ = soft_terms(torch.softmax(x, 1), labels=labels)
    assert float(terms.target_sum[0, 0]) == n - 1000
    value = DicePlusLoss(to_onehot_y=True, softmax=True, reduction="none")(x, labels)
    assert float(value.min()) >= 0.0


# --------------------------------------------------------------------------------------------------------------------
# the generalised Wasserstein Dice loss: wasserstein_terms, wasserstein_dice_from_terms, check_dist_matrix
# --------------------------------------------------------------------------------------------------------------------

_M3 = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.8], [0.5, 0.8, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("blocked", [False, True], ids=["host", "blocked"])
def test_wasserstein_terms_match_the_one_hot_reference(monkeypatch, masked, blocked):
    """``W_k`` and ``V_k`` equal the dense reference: the (B, C, N) map of ``M[y_n, c]`` times ``p``, summed per true
    class with a one-hot (what the function avoids), on the host and through the accelerators' blocked class sums."""
    if blocked:
        monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    x, labels = _make_case((2, 3, 5, 4, 3), seed=7)
    p = torch.softmax(x.detach(), 1).reshape(2, 3, -1)
    y = labels.reshape(2, -1)
    mask = (torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) > 0.3).double() if masked else None
    onehot = F.one_hot(y, 3).movedim(-1, 1).double() * (1.0 if mask is None else mask[:, None])  # (B, K, N)
    w = (_M3[y].movedim(-1, 1) * p).sum(1)  # (B, N): sum_c M[y_n, c] p_{c,n}
    terms = GF.wasserstein_terms(p, y, _M3, mask)
    torch.testing.assert_close(terms.distance, (onehot * w[:, None]).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.volume, onehot.sum(-1), rtol=0, atol=0)


def test_wasserstein_dice_from_terms_closed_forms():
    """A perfect prediction (``W = 0``) scores 0 in both modes; a fully wrong one (``w_n = 1``) scores 1 in
    ``"default"``; GDL weights ``1 / (V + 1)`` by hand."""
    v = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    for mode in ("default", "GDL"):
        assert float(GF.wasserstein_dice_from_terms(GF.WassersteinTerms(torch.zeros_like(v), v), mode, 0.0, 0.0)) == 0
    assert float(GF.wasserstein_dice_from_terms(GF.WassersteinTerms(v, v), "default", 0.0, 0.0)) == 1.0
    w = torch.tensor([[1.0, 0.5, 0.25]], dtype=torch.float64)
    a = 1.0 / (v + 1.0)
    expected = 1.0 - 2.0 * (a * (v - w)).sum() / (a * (2.0 * v - w)).sum()
    torch.testing.assert_close(GF.wasserstein_dice_from_terms(GF.WassersteinTerms(w, v), "GDL", 0.0, 0.0)[0],
                               expected)  # fmt: skip
    tp = (v - w)[0, 1:].sum()
    torch.testing.assert_close(GF.wasserstein_dice_from_terms(GF.WassersteinTerms(w, v), "default", 0.0, 0.0)[0],
                               1.0 - 2.0 * tp / (2.0 * tp + w.sum()))  # fmt: skip


def test_check_dist_matrix_normalises_and_keeps_float_dtypes():
    import numpy as np

    torch.testing.assert_close(GF.check_dist_matrix(torch.tensor([[0, 4], [2, 0]])),
                               torch.tensor([[0.0, 1.0], [0.5, 0.0]]))  # fmt: skip
    assert GF.check_dist_matrix(np.eye(2)).dtype == torch.float64
    assert GF.check_dist_matrix(torch.eye(2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    unit = 1.0 - torch.eye(3)
    assert torch.equal(GF.check_dist_matrix(unit), unit)
    with pytest.raises(ValueError, match=r"`dist_matrix` must be C x C for the C = 2 channels of `input`"):
        GF.check_dist_matrix(unit, 2)


@pytest.mark.parametrize("kw", [dict(weighting_mode="GDL"), dict(ignore_index=255, batch=True, reduction="none")])
def test_wasserstein_function_equals_the_module(make_case, kw):
    x, labels = make_case(SHAPES["3d"])
    labels = _with_ignored(labels, 255) if "ignore_index" in kw else labels
    m = 2.0 * torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    module = GeneralizedWassersteinDicePlusLoss(m, **kw)
    by_keywords = GF.generalized_wasserstein_dice_plus_loss(x, labels, m, **kw)
    by_options = GF.generalized_wasserstein_dice_plus_loss(x, labels, m, WassersteinDiceOptions(**kw))
    assert torch.equal(module(x, labels), by_keywords) and torch.equal(by_options, by_keywords)


def test_wasserstein_function_validates_arguments():
    x, labels = torch.randn(1, 2, 3), torch.zeros(1, 3, dtype=torch.long)
    m = [[0.0, 1.0], [1.0, 0.0]]
    with pytest.raises(TypeError, match="give either `options` or option keywords"):
        GF.generalized_wasserstein_dice_plus_loss(x, labels, m, WassersteinDiceOptions(), batch=True)
    with pytest.raises(TypeError, match="`options` must be a WassersteinDiceOptions, got DiceOptions"):
        GF.generalized_wasserstein_dice_plus_loss(x, labels, m, DiceOptions())
    with pytest.raises(ValueError, match=r"`weighting_mode`.*did you mean 'GDL'"):
        GF.generalized_wasserstein_dice_plus_loss(x, labels, m, weighting_mode="GLD")
    with pytest.raises(ValueError, match=r"`input` must have shape \(B, C, \*spatial\), got \(2,\)"):
        GF.generalized_wasserstein_dice_plus_loss(torch.randn(2), labels, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighting_mode", ["default", "GDL"])
def test_wasserstein_half_logits_give_the_float32_value(make_case, dtype, weighting_mode):
    x64, labels = make_case(SHAPES["3d"])
    low = x64.detach().to(dtype).requires_grad_(True)
    loss = GeneralizedWassersteinDicePlusLoss(1.0 - torch.eye(4), weighting_mode)
    value = loss(low, labels)
    value.backward()
    assert value.dtype == torch.float32 and low.grad.dtype == dtype and torch.isfinite(low.grad).all()
    torch.testing.assert_close(value, loss(low.detach().float(), labels), atol=1e-6, rtol=0)


@pytest.mark.parametrize("as_accelerator", [False, True], ids=["host", "as-accelerator"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(), dict(weighting_mode="GDL", ignore_index=255, batch=True)],
                         ids=["default", "GDL ignore batch"])  # fmt: skip
def test_wasserstein_loss_in_chunks_equals_the_definition(monkeypatch, as_accelerator, dtype, kw):
    """The loss's chunked sums from the logits with their analytic backward (several chunks here; blocked class sums
    in accelerator mode) equal :func:`wasserstein_terms` of the softmax through autograd, value and gradient."""
    monkeypatch.setitem(_ops.CHUNK_ELEMENTS, "cpu", 3 * 4 * 50)  # 50 voxels per chunk of (B=3, C=4)
    if as_accelerator:
        monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    x, labels = _make_case((3, 4, 7, 6, 5), seed=3)
    x = x.detach().to(dtype)
    labels = _with_ignored(labels, 255) if "ignore_index" in kw else labels
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.6, 0.5], [1.0, 0.6, 0.0, 0.7], [1.0, 0.5, 0.7, 0.0]])
    o = WassersteinDiceOptions(**kw)

    def definition(t, y):
        lab, mask = GF.label_map(y, 4, o.ignore_index)
        terms = GF.wasserstein_terms(torch.softmax(t.double(), 1).reshape(3, 4, -1), lab, m.double(), mask)
        if o.batch:
            terms = GF.WassersteinTerms(*(s.sum(0) for s in terms))
        return GF.reduce_loss(GF.wasserstein_dice_from_terms(terms, o.weighting_mode), o.reduction)

    value, grad = _value_and_grad(lambda t, y: GF.generalized_wasserstein_dice_plus_loss(t, y, m, o), x, labels)
    ref_value, ref_grad = _value_and_grad(definition, x, labels)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6}[dtype]
    assert value.dtype == torch.promote_types(dtype, torch.float32) and grad.dtype == dtype
    torch.testing.assert_close(value, ref_value.to(value.dtype), atol=tol, rtol=0)
    torch.testing.assert_close(grad, ref_grad.to(dtype), atol=tol, rtol=1e-3 if dtype == torch.float16 else 1e-6)
