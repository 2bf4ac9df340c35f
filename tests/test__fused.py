"""The fused label-map path (monai_gdl_plus._fused) against the plain autograd path, chunk boundaries included; its
custom ops; and the label-map route building no dense one-hot."""

from __future__ import annotations

import itertools

import monai.losses as ML
import pytest
import torch
from cases import SHAPES, _with_ignored

from monai_gdl_plus import DiceFocalPlusLoss, DicePlusLoss, GeneralizedDiceFocalPlusLoss, GeneralizedDicePlusLoss, _ops
from monai_gdl_plus import _fused as fused

pytestmark = pytest.mark.usefixtures("single_thread")

LOSSES = {"dice": DicePlusLoss, "gdl": GeneralizedDicePlusLoss}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 elements on CPU, so that a few-voxel volume spans several chunks."""
    monkeypatch.setitem(_ops.CHUNK_ELEMENTS, "cpu", 64)


def _value_and_grad(loss, x, y, plain: bool, monkeypatch=None):
    """Loss value and d loss / d x, through the fused path or (``plain``) the plain autograd one."""
    x = x.detach().clone().requires_grad_(True)
    with monkeypatch.context() as m:
        if plain:
            m.setattr(_ops, "FUSED_ROUTE", False)
        value = loss(x, y)
    value.backward()
    return value.detach(), x.grad


def _assert_paths_agree(loss, x, y, monkeypatch, **tol):
    fused_value, fused_grad = _value_and_grad(loss, x, y, False, monkeypatch)
    plain_value, plain_grad = _value_and_grad(loss, x, y, True, monkeypatch)
    torch.testing.assert_close(fused_value, plain_value, **tol)
    torch.testing.assert_close(fused_grad, plain_grad, **tol)


_FLAGS = list(
    itertools.product(["dice", "gdl"], ["softmax", "sigmoid"], [False, True], [None, 255, 2], [0.0, 0.7], [False, True],
                      [None, "sigmoid form", "softmax form"])
)  # fmt: skip


@pytest.mark.parametrize("as_accelerator", [False, True], ids=["cpu", "as-accelerator"])
@pytest.mark.parametrize("name,act,squared,ignore_index,lambda_ce,weighted,focal", _FLAGS)
def test_fused_equals_plain_autograd(
    small_chunks, monkeypatch, as_accelerator, name, act, squared, ignore_index, lambda_ce, weighted, focal
):
    """Values and gradients of both paths agree to float64 rounding, over chunk boundaries, for every flag; also
    with what accelerators run (``as_accelerator``: the max-shifted softmax and blocked class sums)."""
    if as_accelerator:
        monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(2, 5, 4, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 1, 4, 3, 3), generator=g)
    if ignore_index == 255:
        y[:, :, 0] = 255
    loss = LOSSES[name](
        to_onehot_y=True, softmax=act == "softmax", sigmoid=act == "sigmoid", squared_pred=squared,
        ignore_index=ignore_index, lambda_ce=lambda_ce, weight=[1.0, 2.0, 0.5, 1.0, 3.0] if weighted else None,
        lambda_focal=0.0 if focal is None else 0.6, gamma=1.5, focal_alpha=0.3 if weighted else None,
        focal_softmax=focal == "softmax form",
    )  # fmt: skip
    _assert_paths_agree(loss, x, y, monkeypatch, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale,offset", [(60.0, 0.0), (1.0, 150.0), (1.0, -150.0), (1.0, 95.0)])
@pytest.mark.parametrize("lambda_ce", [0.0, 1.0])
def test_large_logits_fall_back_to_the_shifted_softmax(small_chunks, monkeypatch, scale, offset, lambda_ce):
    """Float32 logits whose exponentials overflow or underflow: the chunk is redone with the max subtracted, and
    value and gradient stay those of the (stable) plain path; only the second half of the volume is extreme, so
    the switch happens mid-volume."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 6, 6, 6, generator=g)
    x[..., 3:, :, :] = scale * x[..., 3:, :, :] + offset
    y = torch.randint(0, 4, (1, 1, 6, 6, 6), generator=g)
    loss = DicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=lambda_ce)
    fused_value, fused_grad = _value_and_grad(loss, x, y, False, monkeypatch)
    assert torch.isfinite(fused_value) and torch.isfinite(fused_grad).all()
    # float64 plain path as the reference for the float32 fused one
    plain_value, plain_grad = _value_and_grad(loss, x.double(), y, True, monkeypatch)
    torch.testing.assert_close(fused_value.double(), plain_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad.double(), plain_grad, rtol=1e-4, atol=1e-7)


def test_nan_logits_propagate_instead_of_raising(small_chunks):
    x = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    y = torch.randint(0, 3, (1, 1, 4, 4, 4))
    with torch.no_grad():
        x[0, 1, 2] = float("nan")
    value = DicePlusLoss(to_onehot_y=True, softmax=True)(x, y)
    assert torch.isnan(value)


@pytest.mark.parametrize("offset", [0.0, 200.0])
def test_second_backward_recomputes_the_same_gradient(small_chunks, offset):
    """``retain_graph=True``: the first backward consumed the saved activation; the second recomputes it with the
    same shift decisions, so both gradients are bit-identical."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 5, 5, generator=g)
    x[:, :, 3:] += offset
    x.requires_grad_(True)
    y = torch.randint(0, 4, (2, 1, 5, 5, 5), generator=g)
    value = GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, squared_pred=True)(x, y)
    value.backward(retain_graph=True)
    first, x.grad = x.grad.clone(), None
    value.backward()
    assert torch.equal(x.grad, first)


def test_fused_function_gradcheck_with_mask_and_class_weights():
    """The analytic backward of :func:`fused_label_terms` itself, every output weighted, in float64."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 7), generator=g)
    mask = (torch.rand(2, 7, generator=g) > 0.3).double()
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    gi, gp, gf = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    focals = [_ops.Focal(), _ops.Focal(1, 1.5, 0.3), _ops.Focal(1, 0.0), _ops.Focal(2, 2.0, 0.25),
              _ops.Focal(2, 0.5)]  # fmt: skip
    for softmax, squared, focal in itertools.product([True, False], [False, True], focals):
        if focal.kind == 2 and not softmax:
            continue

        def f(t, softmax=softmax, squared=squared, focal=focal):
            inter, psum, _, nll, fsum = fused.fused_label_terms(
                t, labels, mask, softmax=softmax, squared=squared, ce_weight=w if softmax else None, with_ce=softmax,
                focal=focal,
            )  # fmt: skip
            return (inter * gi).sum() + (psum * gp).sum() + 0.3 * nll + (fsum * gf).sum()

        assert torch.autograd.gradcheck(f, (x,)), focal


def test_the_gradient_is_written_over_the_activation_buffer(monkeypatch):
    """The one logits-sized buffer the forward allocates (the activation) is the one the backward turns into
    ``x.grad``: written in place, not copied out (the 1x-logits peak depends on it)."""
    allocated = []
    real_empty = torch.empty

    def record(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        allocated.append(t)
        return t

    monkeypatch.setattr(fused.torch, "empty", record)
    shape = (1, 4, 2**16)
    x, y = torch.randn(shape), torch.randint(0, 4, (1, 1, 2**16))
    value, grad = _value_and_grad(DicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=0.5), x, y, False, monkeypatch)
    buffers = [t for t in allocated if t.shape == torch.Size(shape)]
    assert len(buffers) == 1 and grad.data_ptr() == buffers[0].data_ptr()
    assert torch.isfinite(value) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------------------------
# the custom ops that torch.compile sees (monai_gdl_plus::label_terms and its backward)
# --------------------------------------------------------------------------------------------------------------------


def _op_inputs(masked: bool, weighted: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    x = 2.0 * torch.randn(2, 4, 30, generator=g, dtype=dtype)
    labels = torch.randint(0, 4, (2, 30), generator=g)
    mask = (torch.rand(2, 30, generator=g) > 0.2).to(dtype) if masked else None
    weight = torch.tensor([0.3, 1.0, 0.6, 0.9], dtype=dtype) if weighted else None
    return x, labels, mask, weight


@pytest.mark.parametrize(
    "softmax,squared,with_ce,focal", [(True, False, True, 2), (True, True, False, 1), (False, True, False, 1),
                                      (False, False, False, 0)],
)  # fmt: skip
@pytest.mark.parametrize("masked,weighted", [(False, False), (True, True)])
def test_custom_op_passes_torch_library_opcheck(softmax, squared, with_ce, focal, masked, weighted):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the op, as torch checks them."""
    x, labels, mask, weight = _op_inputs(masked, weighted)
    alpha = 0.3 if masked else None
    args = (x.requires_grad_(True), labels, mask, weight, softmax, squared, with_ce, focal, 1.5, alpha)
    torch.library.opcheck(torch.ops.monai_gdl_plus.label_terms.default, args)


@pytest.mark.parametrize(
    "softmax,squared,with_ce,focal", [(True, False, True, _ops.Focal(2, 1.5, 0.3)), (True, True, True, _ops.Focal()),
                                      (False, False, False, _ops.Focal(1, 2.0, 0.25))],
)  # fmt: skip
def test_custom_op_equals_the_eager_function_and_passes_gradcheck(small_chunks, softmax, squared, with_ce, focal):
    """What a compiled loss runs (the op, whose backward recomputes the activation) equals the eager Function (whose
    backward overwrites the saved one) in value and gradient, over chunk boundaries; gradcheck in float64."""
    x, labels, mask, weight = _op_inputs(True, True)
    cot = [torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(3)]

    def scalar(out):
        inter, psum, _, nll, fsum = out
        return (inter * cot[0]).sum() + (psum * cot[1]).sum() + 0.3 * nll + (fsum * cot[2]).sum()

    results = []
    for call, flags in ((fused._label_terms_op, tuple(focal)), (fused._FusedLabelTerms.apply, (focal,))):
        xi = x.clone().requires_grad_(True)
        out = call(xi, labels, mask, weight, softmax, squared, with_ce, *flags)
        scalar(out).backward()
        results.append((torch.stack([t.detach() for t in (*out[:3], out[4])]), out[3].detach(), xi.grad))
    for a, b in zip(*results, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t: scalar(fused._label_terms_op(t, labels, mask, weight, softmax, squared, with_ce, *focal)),
        (x.clone().requires_grad_(True),),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_custom_ops_on_half_logits_keep_float32_terms_and_a_gradient_in_the_logits_dtype(dtype):
    """Half logits (what a network returns under AMP): the forward op returns float32 terms and the backward op a
    gradient in the logits' dtype, in the real ops as in the fake ones that torch.compile plans with (opcheck
    compares the two)."""
    x, labels, _, _ = _op_inputs(False, False)
    x = x.to(dtype)
    mask = torch.ones(2, 30)  # as the losses pass them: mask and CE weights in float32
    weight = torch.tensor([0.3, 1.0, 0.6, 0.9])
    flags = (True, False, True, 1, 1.5, 0.25)
    terms = fused._label_terms_op(x, labels, mask, weight, *flags)
    assert [t.dtype for t in terms] == [torch.float32] * 5
    cot = (torch.rand(2, 4), torch.rand(2, 4), torch.tensor(0.3), torch.rand(2, 4))
    grad = fused._label_terms_backward_op(x, labels, mask, weight, *cot, *flags)
    assert grad.dtype == dtype and grad.shape == x.shape
    torch.library.opcheck(torch.ops.monai_gdl_plus.label_terms.default, (x, labels, mask, weight, *flags))
    torch.library.opcheck(
        torch.ops.monai_gdl_plus.label_terms_backward.default, (x, labels, mask, weight, *cot, *flags)
    )


# --------------------------------------------------------------------------------------------------------------------
# the label-map route never builds a dense one-hot
# --------------------------------------------------------------------------------------------------------------------


def _forbid_one_hot(monkeypatch):
    import monai.losses.dice
    import monai.networks
    import monai.networks.utils

    import monai_gdl_plus.functional
    import monai_gdl_plus.losses

    def boom(*args, **kwargs):
        raise AssertionError("a dense one-hot was requested")

    monkeypatch.setattr(torch.nn.functional, "one_hot", boom)
    monkeypatch.setattr(monai.networks.utils, "one_hot", boom)
    monkeypatch.setattr(monai.networks, "one_hot", boom)
    monkeypatch.setattr(monai.losses.dice, "one_hot", boom)
    for module in (monai_gdl_plus.functional, monai_gdl_plus.losses):
        monkeypatch.setattr(module, "one_hot", boom, raising=False)


LABEL_PATH_LOSSES = [
    DicePlusLoss(to_onehot_y=True, softmax=True),
    DiceFocalPlusLoss(to_onehot_y=True, softmax=True, ignore_index=255, alpha=0.25),
    GeneralizedDiceFocalPlusLoss(to_onehot_y=True, sigmoid=True, focal_softmax=True, ignore_index=255),
    DicePlusLoss(to_onehot_y=True, softmax=True, ignore_index=255, lambda_ce=0.5, squared_pred=True),
    DicePlusLoss(to_onehot_y=True, sigmoid=True, ignore_index=2, lambda_ce=0.5),
    GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, ignore_index=255, lambda_ce=0.5),
    GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True),
]


@pytest.mark.parametrize("loss", LABEL_PATH_LOSSES, ids=lambda m: type(m).__name__)
def test_label_map_path_calls_no_one_hot(make_case, monkeypatch, loss):
    x, labels = make_case(SHAPES["3d"])
    labels = _with_ignored(labels, 255)
    if loss.ignore_index != 255:
        labels = labels.clamp_max(3)
    _forbid_one_hot(monkeypatch)
    loss(x, labels).backward()
    # control: the patch does catch MONAI's one-hot
    with pytest.raises(AssertionError, match="dense one-hot"):
        ML.DiceLoss(to_onehot_y=True, softmax=True)(x, labels.clamp_max(3))


class _DenseOneHotDetector(torch.utils._python_dispatch.TorchDispatchMode):
    """Records aten ops whose output has at least B*C*N elements and is integer/bool or comes from one_hot, or,
    with ``scatter=True``, from a scatter (the forward pass; backward legitimately scatters the dense gradient)."""

    def __init__(self, dense_numel: int, scatter: bool = True):
        super().__init__()
        self.dense_numel = dense_numel
        self.scatter = scatter
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.numel() < self.dense_numel:
                continue
            if not t.is_floating_point() or "one_hot" in name or (self.scatter and "scatter" in name):
                self.found.append(f"{name} -> {tuple(t.shape)} {t.dtype}")
        return out


@pytest.mark.parametrize("loss", LABEL_PATH_LOSSES, ids=lambda m: type(m).__name__)
def test_label_map_path_makes_no_dense_integer_or_scattered_tensor(make_case, loss):
    x, labels = make_case(SHAPES["3d"])
    labels = _with_ignored(labels, 255)
    if loss.ignore_index != 255:
        labels = labels.clamp_max(3)
    with _DenseOneHotDetector(x.numel()) as forward:
        value = loss(x, labels)
    with _DenseOneHotDetector(x.numel(), scatter=False) as backward:
        value.backward()
    assert forward.found == [] and backward.found == []
    # control: MONAI's one-hot path is seen by the same detector
    with _DenseOneHotDetector(x.numel()) as control:
        ML.DiceLoss(to_onehot_y=True, softmax=True)(x, labels.clamp(0, 3))
    assert control.found
