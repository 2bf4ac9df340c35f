"""Tests of :mod:`monai_gdl_plus._ops`: the class sums on every route, the value checks on and off the host, and the
per-voxel focal formulas' hand-written gradients against autograd."""

from __future__ import annotations

import pytest
import reference as R
import torch

from monai_gdl_plus import DicePlusLoss, GeneralizedDicePlusLoss, _ops

pytestmark = pytest.mark.usefixtures("single_thread")

BOTH = pytest.mark.parametrize("loss_cls", [DicePlusLoss, GeneralizedDicePlusLoss])

# --------------------------------------------------------------------------------------------------------------------
# class_sums
# --------------------------------------------------------------------------------------------------------------------


def test_class_sums_equal_a_one_hot_reference_on_every_route(monkeypatch):
    """Sums of values (scatter-add, with or without a gradient), voxel counts (``bincount``, or the scatter while
    ``torch.compile`` traces) and the accelerators' blocked sums all equal a dense one-hot sum."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 6, (3, 10000), generator=g)
    values = torch.rand(3, 10000, generator=g)
    onehot = torch.nn.functional.one_hot(labels, 6).double()  # (B, N, C)
    expected = (values.double()[..., None] * onehot).sum(1)
    plain = _ops.class_sums(values, labels, 6)
    graded = _ops.class_sums(values.clone().requires_grad_(True), labels, 6)
    blocked = _ops.class_sums(values, labels, 6, blocked=True)
    assert plain.dtype == torch.float64 and graded.requires_grad
    for got in (plain, graded.detach()):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(blocked, expected, rtol=1e-6, atol=0)  # float32 partial sums of 4096 voxels
    counts = _ops.class_sums(None, labels, 6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = _ops.class_sums(None, labels, 6)
    for got in (counts, traced, _ops.class_sums(None, labels, 6, blocked=True)):
        torch.testing.assert_close(got, onehot.sum(1), rtol=0, atol=0)
    # classes absent from a sample are zero, not cut off (minlength)
    counts = _ops.class_sums(None, torch.tensor([[0, 0, 1], [0, 0, 0]]), 4)
    assert counts.tolist() == [[2.0, 1.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("n", [1, _ops.BLOCK - 1, _ops.BLOCK, 2 * _ops.BLOCK, 2 * _ops.BLOCK + 1])
def test_blocked_class_sums_at_whole_and_ragged_block_counts(n):
    """The accelerators' blocked sums equal a dense one-hot sum whether the last block is whole or ragged: an
    off-by-one in the block index leaves ragged volumes right but sends the last voxel of a whole one past the
    partial histograms."""
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 3, (2, n), generator=g)
    values = torch.rand(2, n, generator=g, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    blocked = _ops.class_sums(values, labels, 3, blocked=True)
    torch.testing.assert_close(blocked, (values[..., None] * onehot).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_ops.class_sums(None, labels, 3, blocked=True), onehot.sum(1), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# value_check: host checks, device assertions off the host
# --------------------------------------------------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize(
    "case", ["label 7", "label 7 ignore 255", "non-binary one-hot", "non-integer label map"]
)  # fmt: skip
def test_value_checks_in_accelerator_mode_are_device_assertions(monkeypatch, loss_cls, case):
    """What a GPU runs, on CPU (``_ops.HOST_DEVICES`` emptied): the value checks are asynchronous device assertions
    (RuntimeError with the same message, no host sync), and ``validate=True`` makes them the readable ValueError."""
    monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    x = torch.randn(2, 3, 4, 4)
    kw: dict = dict(to_onehot_y=True, softmax=True)
    if case.startswith("label 7"):
        y = torch.zeros(2, 1, 4, 4, dtype=torch.long)
        y[1, 0, 2, 2] = 7
        kw["ignore_index"] = 255 if "255" in case else None
        match = r"`target` label values must lie in \[0, 3\)"
    elif case == "non-binary one-hot":
        y = R.one_hot(torch.randint(0, 3, (2, 4, 4)), 3, torch.float32)
        y[0, :, 0, 0] = torch.tensor([0.5, 0.25, 0.25])
        kw = dict(softmax=True)
        match = r"`target` must be binary"
    else:
        y = torch.zeros(2, 1, 4, 4)
        y[0, 0, 1, 1] = 1.5
        match = r"`target` label map must hold integer class indices"
    with pytest.raises(RuntimeError, match=match):
        loss_cls(**kw)(x, y)
    with pytest.raises(ValueError, match=match):
        loss_cls(validate=True, **kw)(x, y)


# --------------------------------------------------------------------------------------------------------------------
# the per-voxel focal formulas: each hand-written gradient is autograd's of its value formula
# --------------------------------------------------------------------------------------------------------------------

FOCALS = [_ops.Focal(1, gamma, alpha) for gamma in (0.0, 0.5, 1.5, 2.0) for alpha in (None, 0.25)]


@pytest.mark.parametrize("focal", FOCALS, ids=lambda f: f"gamma={f.gamma}-{f.alpha}")
@pytest.mark.parametrize("t", [0.0, 1.0])
def test_sigmoid_focal_grad_is_autograd_of_sigmoid_focal(focal, t):
    """The fused route's backward uses :func:`sigmoid_focal_grad`; the plain route differentiates
    :func:`sigmoid_focal` by autograd: both must be the same derivative (float64, logits from -12 to 12)."""
    x = torch.linspace(-12.0, 12.0, 241, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(_ops.sigmoid_focal(x, t, focal).sum(), x)
    torch.testing.assert_close(_ops.sigmoid_focal_grad(x.detach(), t, focal), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("focal", [f._replace(kind=2) for f in FOCALS], ids=lambda f: f"gamma={f.gamma}-{f.alpha}")
def test_softmax_focal_grad_is_autograd_of_softmax_focal(focal):
    """:func:`softmax_focal_grad` is d :func:`softmax_focal` / d log p element by element, class-0 alpha included
    (float64 log-probabilities of random logits, every class present)."""
    g = torch.Generator().manual_seed(9)
    lp = torch.log_softmax(3.0 * torch.randn(2, 4, 50, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    classes = torch.randint(0, 4, (2, 1, 50), generator=g)
    (expected,) = torch.autograd.grad(_ops.softmax_focal(lp, classes, focal).sum(), lp)
    got = _ops.softmax_focal_grad(lp.detach(), classes, focal)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------------------------
# autocast_off
# --------------------------------------------------------------------------------------------------------------------


def test_autocast_off_turns_autocast_off_and_is_a_no_op_where_there_is_none():
    """Under autocast, the context computes in float32; for a device type without autocast (meta) it is a no-op
    context instead of torch.autocast's RuntimeError, and leaves the enclosing autocast on."""
    a = torch.ones(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with _ops.autocast_off(torch.device("cpu")):
            assert (a @ a).dtype == torch.float32
        with _ops.autocast_off(torch.device("meta")):
            assert (a @ a).dtype == torch.bfloat16
            m = torch.ones(4, 4, device="meta")
            assert (m @ m).device.type == "meta"
