"""Tests of :mod:`monai_gdl_plus.functional` against ``tests/reference.py`` and closed forms; Modules included."""

from __future__ import annotations

import functools
import itertools

import pytest
import reference as R
import torch

from monai_gdl_plus import DicePlusLoss, GeneralizedDicePlusLoss
from monai_gdl_plus import functional as GF
from monai_gdl_plus.options import DiceOptions

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


def test_dice_from_terms_empty_class_is_zero_and_finite():
    zero = torch.zeros(1, 2)
    f = GF.dice_from_terms(GF.DiceTerms(zero, zero, zero))
    assert torch.isfinite(f).all() and (f == 0).all()


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


def test_blocked_class_sums_equal_the_sequential_scatter():
    """The accelerator histogram (per-block partial sums) equals the CPU float64 scatter-add."""
    from monai_gdl_plus._ops import BLOCK as _BLOCK
    from monai_gdl_plus._ops import class_sums

    torch.manual_seed(0)
    n = 3 * _BLOCK + 17  # a ragged last block
    labels = torch.randint(0, 5, (2, n))
    values = torch.rand(2, n)
    sequential = class_sums(values, labels, 5, blocked=False)
    blocked = class_sums(values, labels, 5, blocked=True)
    torch.testing.assert_close(blocked, sequential, rtol=1e-6, atol=1e-6)
    per_sample = [[values[i][labels[i] == k].double().sum() for k in range(5)] for i in range(2)]
    expected = torch.stack([torch.stack(row) for row in per_sample])
    torch.testing.assert_close(sequential, expected)
