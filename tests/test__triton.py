"""The Triton kernels (monai_gdl_plus._triton, ._triton_kernels) against the torch path of monai_gdl_plus._fused and
against MONAI's classes, run by Triton's interpreter on CPU tensors; the MONAI_GDL_PLUS_KERNELS switch; the
traffic count; and (slow) the kernels compiled for an sm_90 target by Triton's real compiler, no GPU needed.

Interpreter mode: Triton decides between interpreting and compiling as it defines a kernel, its standard library's
(``tl.zeros``, ``tl.sum``) at ``import triton``, so ``TRITON_INTERPRET=1`` has to be set before anything imports
``triton`` (``torch._inductor`` does): ``conftest.py`` sets it for machines without a GPU. What needs the real
compiler (sm_90 cubins, the fallback when a kernel does not compile) runs in a fresh interpreter without it.
"""

from __future__ import annotations

import itertools
import warnings

import monai.losses as ML
import pytest
import torch

triton = pytest.importorskip("triton")
if type(triton.language.zeros).__name__ != "InterpretedFunction":
    pytest.skip("Triton was imported without TRITON_INTERPRET=1 (see conftest.py)", allow_module_level=True)

from cases import forbid_host_syncs  # noqa: E402

from monai_gdl_plus import (  # noqa: E402
    DiceCEPlusLoss,
    DiceFocalPlusLoss,
    DicePlusLoss,
    GeneralizedDicePlusLoss,
    _fused,
    _ops,
    _triton,
)
from monai_gdl_plus._ops import Focal  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def forced(monkeypatch):
    """The Triton path forced."""
    monkeypatch.setenv(_triton.ENV_VAR, "triton")


def _inputs(b, c, n, dtype=torch.float64, seed=0, masked=True, weighted=False, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(b, c, n, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, c, (b, n), generator=g)
    mask = (torch.rand(b, n, generator=g) > 0.3).to(torch.float64 if dtype == torch.float64 else torch.float32)
    w = torch.linspace(0.3, 1.5, c, dtype=torch.promote_types(dtype, torch.float32)) if weighted else None
    return x, labels, mask if masked else None, w


def _terms_and_grad(kernels, monkeypatch, x, labels, mask, w, **flags):
    """fused_label_terms' five terms and d(sum of the terms times fixed random cotangents)/dx, on the ``kernels``
    path (MONAI_GDL_PLUS_KERNELS)."""
    monkeypatch.setenv(_triton.ENV_VAR, kernels)
    xi = x.detach().clone().requires_grad_(True)
    out = _fused.fused_label_terms(xi, labels, mask, ce_weight=w, **flags)
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in out]
    total = sum((o * t).sum() for o, t in zip(out, cot, strict=False) if o.requires_grad)
    (grad,) = torch.autograd.grad(total, xi)
    return [o.detach() for o in out], grad


def _assert_paths_agree(monkeypatch, x, labels, mask, w, rtol=1e-5, atol=1e-6, grad_tol=None, **flags):
    """Triton equals the torch path in each term and in the gradient (``rtol`` relative, ``atol`` of scale 1)."""
    ours, g_ours = _terms_and_grad("triton", monkeypatch, x, labels, mask, w, **flags)
    ref, g_ref = _terms_and_grad("torch", monkeypatch, x, labels, mask, w, **flags)
    for name, a, r in zip(("inter", "psum", "tsum", "nll", "focal"), ours, ref, strict=False):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(g_ours, g_ref, **(grad_tol or dict(rtol=rtol, atol=atol)))
    return ours, g_ours


_FOCAL = [(0, None), (1, None), (1, 0.25), (2, None), (2, 0.25)]  # (kind, alpha)
_SOFTMAX_FLAGS = [(sq, ce, f, a, m) for sq, ce, (f, a), m in
                  itertools.product([False, True], ["none", "ce", "weighted ce"], _FOCAL, [True, False])]  # fmt: skip
_SIGMOID_FLAGS = [(sq, f, a, m) for sq, (f, a), m in itertools.product([False, True], _FOCAL[:3], [True, False])]


@pytest.mark.parametrize("squared,ce,focal,alpha,masked", _SOFTMAX_FLAGS)
def test_softmax_flags_equal_the_torch_path(monkeypatch, squared, ce, focal, alpha, masked):
    """Every softmax flag combination, float64 (so differences are the kernels', not rounding's)."""
    x, labels, mask, w = _inputs(2, 5, 37, masked=masked, weighted=ce == "weighted ce")
    _assert_paths_agree(monkeypatch, x, labels, mask, w, rtol=1e-9, atol=1e-11, softmax=True, squared=squared,
                        with_ce=ce != "none", focal=Focal(focal, 1.5, alpha))  # fmt: skip


@pytest.mark.parametrize("softmax", [True, False])
def test_float64_focal_parameters_are_exact(monkeypatch, softmax):
    """gamma 1.3 and alpha 0.3 (not float32 numbers) in a float64 kernel: agreement to float64 rounding. (The
    softmax form without alpha: the torch path's ``_ops._class_alpha`` makes its class factors float32, a
    ``torch.where`` of two Python floats.)"""
    x, labels, mask, w = _inputs(2, 4, 19)
    _assert_paths_agree(monkeypatch, x, labels, mask, w, rtol=1e-12, atol=1e-14, softmax=softmax,
                        focal=Focal(2, 1.3, None) if softmax else Focal(1, 1.3, 0.3))  # fmt: skip


@pytest.mark.parametrize("squared,focal,alpha,masked", _SIGMOID_FLAGS)
def test_sigmoid_flags_equal_the_torch_path(monkeypatch, squared, focal, alpha, masked):
    x, labels, mask, w = _inputs(2, 5, 37, masked=masked)
    _assert_paths_agree(monkeypatch, x, labels, mask, w, rtol=1e-9, atol=1e-11, softmax=False, squared=squared,
                        focal=Focal(focal, 1.5, alpha))  # fmt: skip


@pytest.mark.parametrize("c", [1, 2, 3, 4, 16, 105, 133])
@pytest.mark.parametrize("softmax", [True, False])
def test_class_counts(monkeypatch, c, softmax):
    """C from 1 to 133 (133: two class tiles, the online softmax), N = 19 (a partial voxel block), float32 logits
    against the torch path in float32; all terms and both focal forms that the activation allows."""
    x, labels, mask, w = _inputs(2, c, 19, dtype=torch.float32, weighted=softmax)
    focal = Focal(2 if softmax and c % 2 else 1, 2.0, 0.25)
    _assert_paths_agree(monkeypatch, x, labels, mask, w, softmax=softmax, squared=c % 2 == 0, with_ce=softmax,
                        focal=focal)  # fmt: skip


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("squared", [False, True])
def test_many_tiles_and_voxel_blocks(monkeypatch, softmax, squared):
    """Small tiles forced: 4 class tiles of 4, voxel blocks of 16, 3 programs a sample of 4 blocks each (the
    partial rows read back and rewritten), N = 141 (the last program's last 3 blocks empty)."""
    monkeypatch.setattr(_triton, "CLASS_TILE", 4)
    monkeypatch.setattr(_triton, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(_triton, "TARGET_PROGRAMS", 4)
    cfg = _triton._config(2, 15, 141)
    assert (cfg.c_tiles, cfg.block_n, cfg.iters, cfg.programs) == (4, 16, 4, 3)
    x, labels, mask, w = _inputs(2, 15, 141, weighted=True)
    _assert_paths_agree(monkeypatch, x, labels, mask, w, rtol=1e-9, atol=1e-11, softmax=softmax, squared=squared,
                        with_ce=softmax, focal=Focal(2 if softmax else 1, 2.0, 0.25))  # fmt: skip


def test_all_voxels_masked(monkeypatch):
    """Everything ignored: zero terms, zero gradient, no NaN (as the torch path)."""
    x, labels, mask, w = _inputs(2, 6, 23, weighted=True)
    out, grad = _assert_paths_agree(monkeypatch, x, labels, torch.zeros_like(mask), w, softmax=True, with_ce=True,
                                    focal=Focal(2, 2.0, 0.25))  # fmt: skip
    assert all(bool((o == 0).all()) for o in out) and bool((grad == 0).all())


def test_absent_classes(monkeypatch):
    """Classes 1, 3 and 4 never appear: their intersection, volume and true-class sums are 0."""
    x, labels, mask, w = _inputs(2, 5, 29, weighted=True)
    labels = labels.remainder(2) * 2  # 0 and 2 only
    out, _ = _assert_paths_agree(monkeypatch, x, labels, mask, w, rtol=1e-9, atol=1e-11, softmax=True, with_ce=True,
                                 focal=Focal(2, 2.0, None))  # fmt: skip
    assert bool((out[0][:, [1, 3, 4]] == 0).all()) and bool((out[2][:, [1, 3, 4]] == 0).all())


def test_large_logits(monkeypatch):
    """Logits far from 0 (exp overflows float32 without the max shift) and a wide spread."""
    x, labels, mask, w = _inputs(2, 6, 31, dtype=torch.float32, scale=60.0)
    x[0] += 150.0
    _assert_paths_agree(monkeypatch, x, labels, mask, w, rtol=1e-5, atol=1e-5, softmax=True, with_ce=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [3, 133])
def test_half_precision_logits(monkeypatch, dtype, c):
    """fp16/bf16 logits: terms in float32 equal the torch path's (which computes in float32 too); the gradient,
    in the logits' dtype, within one rounding of that dtype."""
    x, labels, mask, w = _inputs(2, c, 21, dtype=dtype, weighted=True)
    eps = torch.finfo(dtype).eps
    out, grad = _assert_paths_agree(monkeypatch, x, labels, mask, w, grad_tol=dict(rtol=2 * eps, atol=eps * 1e-2),
                                    softmax=True, squared=True, with_ce=True, focal=Focal(1, 2.0, 0.25))  # fmt: skip
    assert grad.dtype == dtype and out[0].dtype == torch.float32


def test_float32_kernels_equal_the_float64_reference(monkeypatch):
    """float32 logits through the kernels against the torch path in float64 on the same values: 1e-5 relative."""
    x, labels, mask, w = _inputs(2, 7, 33, dtype=torch.float32, weighted=True)
    flags = dict(softmax=True, squared=False, with_ce=True, focal=Focal(2, 2.0, 0.25))
    ours, g_ours = _terms_and_grad("triton", monkeypatch, x, labels, mask, w, **flags)
    ref, g_ref = _terms_and_grad("torch", monkeypatch, x.double(), labels, mask.double(), w.double(), **flags)
    for a, r in zip(ours, ref, strict=False):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softmax", [True, False])
def test_gradcheck_float64(softmax):
    """torch.autograd.gradcheck of triton_label_terms in float64 (finite differences through the forward kernel
    against the backward kernel)."""
    x, labels, mask, w = _inputs(1, 3, 5, weighted=True)
    flags = dict(softmax=softmax, squared=True, ce_weight=w if softmax else None, with_ce=softmax,
                 focal=Focal(2 if softmax else 1, 1.5, 0.25))  # fmt: skip

    def terms(xi):
        inter, psum, _, nll, fsum = _triton.triton_label_terms(xi, labels, mask, **flags)
        return inter, psum, nll, fsum

    assert torch.autograd.gradcheck(terms, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_second_backward_recomputes(monkeypatch):
    """retain_graph: a second backward gives the same gradient (nothing saved is overwritten)."""
    x, labels, mask, w = _inputs(2, 4, 17, weighted=True)
    xi = x.clone().requires_grad_(True)
    out = _triton.triton_label_terms(xi, labels, mask, softmax=True, ce_weight=w, with_ce=True)
    total = out[0].sum() + 2.0 * out[1].sum() + out[3]
    (g1,) = torch.autograd.grad(total, xi, retain_graph=True)
    (g2,) = torch.autograd.grad(total, xi)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_noncontiguous_logits(monkeypatch):
    x, labels, mask, w = _inputs(2, 5, 40)
    x = x[:, :, ::2]  # a strided view
    _assert_paths_agree(monkeypatch, x, labels[:, ::2], mask[:, ::2], None, rtol=1e-9, atol=1e-11, softmax=True)


# ------------------------------------------------------------------------------------------------ MONAI's classes


def _monai_case(ours_cls, monai_cls, **kw):
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(2, 4, 5, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 1, 5, 4, 3), generator=g)
    y[1][y[1] == 3] = 0  # class 3 absent from the second sample
    ours_kw = dict(normalize_weights=False) if ours_cls is GeneralizedDicePlusLoss else {}  # MONAI's weights
    monai_kw = {k: v for k, v in kw.items() if k != "focal_softmax"}
    return ours_cls(to_onehot_y=True, **kw, **ours_kw), monai_cls(to_onehot_y=True, **monai_kw), x, y


_MONAI_CASES = {
    "dice softmax": (DicePlusLoss, ML.DiceLoss, dict(softmax=True)),
    "dice sigmoid squared": (DicePlusLoss, ML.DiceLoss, dict(sigmoid=True, squared_pred=True)),
    "dice softmax no background batch": (DicePlusLoss, ML.DiceLoss, dict(softmax=True, include_background=False,
                                                                         batch=True)),
    "dice+ce weighted": (DiceCEPlusLoss, ML.DiceCELoss, dict(softmax=True, weight=torch.tensor([0.5, 1.0, 2.0, 1.5],
                                                                                             dtype=torch.float64))),
    "gdl square": (GeneralizedDicePlusLoss, ML.GeneralizedDiceLoss, dict(softmax=True)),
    "gdl simple sigmoid": (GeneralizedDicePlusLoss, ML.GeneralizedDiceLoss, dict(sigmoid=True, w_type="simple")),
    "dice+focal softmax form": (DiceFocalPlusLoss, "DiceLoss + FocalLoss(use_softmax=True)",
                                dict(softmax=True, focal_softmax=True, gamma=1.5, alpha=0.25)),
    "dice+focal sigmoid form": (DiceFocalPlusLoss, ML.DiceFocalLoss, dict(sigmoid=True, gamma=2.0, alpha=0.25)),
}  # fmt: skip


@pytest.mark.parametrize("case", _MONAI_CASES)
def test_losses_on_the_triton_path_equal_monai(monkeypatch, case):
    """The losses (label map, to_onehot_y=True) with MONAI_GDL_PLUS_KERNELS=triton equal MONAI's classes in value
    and gradient; the kernels did run (their launch is counted)."""
    ours_cls, monai_cls, kw = _MONAI_CASES[case]
    if isinstance(monai_cls, str):  # MONAI's DiceFocalLoss takes the sigmoid form only: its two parts
        dice = ML.DiceLoss(to_onehot_y=True, softmax=True)
        focal = ML.FocalLoss(to_onehot_y=True, use_softmax=True, gamma=kw["gamma"], alpha=kw["alpha"])
        ours, _, x, y = _monai_case(ours_cls, lambda **_: None, **kw)

        def ref(x, y):
            return dice(x, y) + focal(x, y)
    else:
        ours, ref, x, y = _monai_case(ours_cls, monai_cls, **kw)
    calls = []
    real = _fused.triton_label_terms
    monkeypatch.setattr(_fused, "triton_label_terms", lambda *a, **k: calls.append(1) or real(*a, **k))
    values, grads = [], []
    for loss in (ours, ref):
        xi = x.clone().requires_grad_(True)
        v = loss(xi, y)
        (g,) = torch.autograd.grad(v, xi)
        values.append(v.detach())
        grads.append(g)
    assert calls
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def _loss_value_and_grad(loss, x, y, kernels, monkeypatch, autocast=None):
    monkeypatch.setenv(_triton.ENV_VAR, kernels)
    xi = x.clone().requires_grad_(True)
    if autocast is None:
        v = loss(xi, y)
    else:
        with torch.autocast("cpu", dtype=autocast):
            v = loss(xi, y)
    (g,) = torch.autograd.grad(v, xi)
    return v.detach(), g


@pytest.mark.parametrize("ignore_index", [255, 2])
@pytest.mark.parametrize("loss_cls", [DiceCEPlusLoss, DiceFocalPlusLoss])
def test_ignore_index_on_the_triton_path(monkeypatch, ignore_index, loss_cls):
    """ignore_index out of range (255) and in range (2): the losses' ignore mask through the kernels equals the
    torch path, CE/focal included."""
    _, _, x, y = _monai_case(DicePlusLoss, ML.DiceLoss, softmax=True)
    y = y.clone()
    y[:, :, 0] = ignore_index
    extra = dict(lambda_ce=0.5) if loss_cls is DiceFocalPlusLoss else {}
    loss = loss_cls(to_onehot_y=True, softmax=True, ignore_index=ignore_index, **extra)
    ours = _loss_value_and_grad(loss, x, y, "triton", monkeypatch)
    ref = _loss_value_and_grad(loss, x, y, "torch", monkeypatch)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast(monkeypatch, dtype):
    """Under CPU autocast the Triton path's value and gradient equal the torch path's (both sum in float32)."""
    _, _, x, y = _monai_case(DicePlusLoss, ML.DiceLoss, softmax=True)
    loss = DiceCEPlusLoss(to_onehot_y=True, softmax=True, squared_pred=True)
    ours = _loss_value_and_grad(loss, x.float(), y, "triton", monkeypatch, autocast=dtype)
    ref = _loss_value_and_grad(loss, x.float(), y, "torch", monkeypatch, autocast=dtype)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_no_host_syncs(monkeypatch):
    """A training step on the Triton path with the accelerator code paths (``_ops.HOST_DEVICES`` emptied) reads
    nothing back to the host: no ``item``, ``bool``, ``float``, ``cpu``, ``bincount``, ``nonzero`` ..."""
    monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    _, _, x, y = _monai_case(DicePlusLoss, ML.DiceLoss, softmax=True)
    loss = DiceFocalPlusLoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, focal_softmax=True, ignore_index=255)
    x = x.float().requires_grad_(True)
    forbid_host_syncs(monkeypatch)
    loss(x, y).backward()
    assert x.grad is not None


@pytest.mark.slow
def test_compiled_loss_runs_the_kernels(monkeypatch):
    """torch.compile (inductor, CPU): the custom ops' bodies take the Triton kernels (forward and backward) and the
    value and gradient equal eager's torch path."""
    import torch._dynamo

    ours, _, x, y = _monai_case(DiceCEPlusLoss, ML.DiceCELoss, softmax=True)
    x = x.float()
    calls = {"forward": 0, "backward": 0}
    for name in ("label_terms_forward", "label_terms_backward"):
        real = getattr(_fused, name)
        key = name.rsplit("_", 1)[1]

        def counted(*a, real=real, key=key, **k):
            calls[key] += 1
            return real(*a, **k)

        monkeypatch.setattr(_fused, name, counted)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, dynamic=False)
    xi = x.clone().requires_grad_(True)
    v = compiled(xi, y)
    (g,) = torch.autograd.grad(v, xi)
    assert calls == {"forward": 1, "backward": 1}
    monkeypatch.setenv(_triton.ENV_VAR, "torch")
    xr = x.clone().requires_grad_(True)
    vr = ours(xr, y)
    (gr,) = torch.autograd.grad(vr, xr)
    torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------- the switch


def _forbid_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernels ran")

    monkeypatch.setattr(_fused, "triton_label_terms", refuse)


@pytest.mark.parametrize("value", ["torch", "auto", None])
def test_torch_and_auto_on_cpu_take_the_torch_path(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(_triton.ENV_VAR)
    else:
        monkeypatch.setenv(_triton.ENV_VAR, value)
    _forbid_kernels(monkeypatch)
    x, labels, mask, _ = _inputs(1, 3, 8)
    _fused.fused_label_terms(x, labels, mask, softmax=True)


def test_auto_takes_the_kernels_on_triton_devices(monkeypatch):
    """auto picks Triton on a device of TRITON_DEVICES (CPU added, under the interpreter)."""
    monkeypatch.setenv(_triton.ENV_VAR, "auto")
    monkeypatch.setattr(_triton, "TRITON_DEVICES", {"cuda", "cpu"})
    x, labels, mask, _ = _inputs(1, 3, 8)
    assert _triton.use_triton(x, mask, softmax=True)


def test_unknown_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv(_triton.ENV_VAR, "cuda")
    x, labels, mask, _ = _inputs(1, 3, 8)
    with pytest.raises(ValueError, match=r"`MONAI_GDL_PLUS_KERNELS` must be one of \('auto', 'triton', 'torch'\)"):
        _fused.fused_label_terms(x, labels, mask, softmax=True)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton, "_interpreting", lambda: False)
    x, labels, mask, _ = _inputs(1, 3, 8)
    with pytest.raises(ValueError, match=r"MONAI_GDL_PLUS_KERNELS=triton` on cpu tensors needs TRITON_INTERPRET=1"):
        _fused.fused_label_terms(x, labels, mask, softmax=True)


def test_forced_triton_without_triton(monkeypatch):
    monkeypatch.setattr(_triton, "_TRITON", False)  # as if it had failed to import
    x, labels, mask, _ = _inputs(1, 3, 8)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        _fused.fused_label_terms(x, labels, mask, softmax=True)


def test_auto_falls_back_when_the_kernels_do_not_compile(monkeypatch):
    """auto mode on a Triton device whose compiler fails: one warning naming the reason, then the torch path, and no
    second warning for the same arguments (the real failure, without the interpreter: test_without_the_interpreter)."""
    monkeypatch.setenv(_triton.ENV_VAR, "auto")
    monkeypatch.setattr(_triton, "TRITON_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(_triton, "_interpreting", lambda: False)

    def fail(*args):
        raise RuntimeError("ptxas fatal: out of registers\nsecond line")

    monkeypatch.setattr(_triton, "_warm_up", fail)
    monkeypatch.setattr(_triton, "_COMPILED", {})
    x, labels, mask, _ = _inputs(1, 3, 8)
    with pytest.warns(RuntimeWarning, match=r"did not compile \(RuntimeError: ptxas fatal: out of registers\); using"):
        got = _fused.fused_label_terms(x, labels, mask, softmax=True, with_ce=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _fused.fused_label_terms(x, labels, mask, softmax=True, with_ce=True)
    monkeypatch.setenv(_triton.ENV_VAR, "torch")
    expected = _fused.fused_label_terms(x, labels, mask, softmax=True, with_ce=True)
    for a, b, e in zip(got, again, expected, strict=False):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        torch.testing.assert_close(b, e, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- traffic


def test_traffic_is_about_three_logits():
    """One class tile (or a sigmoid): the logits read once forward, once backward, the gradient written once (3 L)
    plus the labels (8 bytes a voxel, twice) and small partial sums; several tiles under a softmax read the logits
    twice each way (5 L)."""
    for c, b, n in ((16, 2, 128**3), (105, 1, 96**3)):
        t = _triton.kernel_traffic(b, c, n, torch.float32)
        labels = 2 * 8 * b * n / t.logits
        assert 3.0 + labels < t.total_l < 3.0 + labels + 0.1, (c, t)
        assert t.written / t.logits < 1.02 and t.launches == 6
    multi = _triton.kernel_traffic(1, 133, 96**3, torch.float32)
    assert 5.0 < multi.total_l < 5.7
    assert _triton.kernel_traffic(1, 133, 96**3, torch.float32, softmax=False).total_l < 3.6


def test_traffic_counts_the_launches(monkeypatch):
    """kernel_traffic's launch count: the two kernels plus the aten ops around them that run a kernel of their own,
    counted over one forward + backward (a TorchDispatchMode; allocation, views and no-op casts launch nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    quiet = {"empty", "empty_strided", "detach", "alias", "view", "slice", "select", "unbind", "expand", "t",
             "as_strided", "lift_fresh", "ones_like", "promote_types"}  # fmt: skip

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in quiet:
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, labels, mask, w = _inputs(2, 6, 40, dtype=torch.float32, weighted=True)
    k = _triton._kernels()
    for with_ce, focal in ((False, 0), (True, 2), (True, 1)):
        launches = []
        for name in ("forward_kernel", "backward_kernel"):
            monkeypatch.setattr(k, name, _Counted(getattr(_triton._kernels(), name), launches))
        xi = x.clone().requires_grad_(True)
        count = Count()
        with count:
            out = _triton.triton_label_terms(xi, labels, mask, softmax=True, ce_weight=w, with_ce=with_ce,
                                             focal=Focal(focal, 2.0, None))  # fmt: skip
            used = [o for o in out if o.requires_grad]
            torch.autograd.backward(used, [torch.ones_like(o) for o in used])
        monkeypatch.undo()
        expected = _triton.kernel_traffic(2, 6, 40, torch.float32, with_ce=with_ce, focal=focal, mask=True,
                                          ce_weight=True)  # fmt: skip
        assert len(launches) == 2
        assert len(launches) + len(count.ops) == expected.launches, (with_ce, focal, count.ops)


class _Counted:
    """A kernel whose launches are recorded."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch.utils._python_dispatch import _disable_current_modes

            self.launches.append(grid)
            with _disable_current_modes():  # the interpreter's own copies are no launches of a GPU run
                return self.kernel[grid](*args, **kwargs)

        return launch


# ------------------------------------------------------------------------------- compiled for a GPU, without one

# run in a fresh interpreter without TRITON_INTERPRET: Triton's compiler builds both kernels to sm_90 (H100/H200)
# cubins for each case, and the package's own fallback meets a real failure (no CUDA driver to compile for here)
_COMPILER_SCRIPT = r"""
import json, os, sys, warnings
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from monai_gdl_plus import _fused, _triton
from monai_gdl_plus._ops import Focal

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
out = {"compiled": [], "warnings": []}
k = _triton._kernels()
for dtype, c, softmax, squared, with_ce, focal in json.loads(sys.argv[1]):
    dtype = DT[dtype]
    cfg = _triton._config(2, c, 128**3)
    x = torch.empty(2, c, 8, dtype=dtype)
    flags = _triton._flags(x, x, x, softmax, squared, with_ce, Focal(focal, 2.0, 0.25), cfg)
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    kinds = {"x_ptr": PTR[dtype], "dx_ptr": PTR[dtype], "lab_ptr": "*i64", "m_ptr": "*fp32", "C": "i32", "N": "i32",
             "term_stride": "i32", "gamma": "fp32", "gamma_lo": "fp32", "alpha": "fp32", "alpha_lo": "fp32"}
    for kernel, warps in ((k.forward_kernel, _triton._FORWARD_WARPS), (k.backward_kernel, _triton._BACKWARD_WARPS)):
        sig = {a: "constexpr" if a in flags else kinds.get(a, acc) for a in kernel.arg_names}
        src = ASTSource(fn=kernel, signature=sig, constexprs=flags)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        out["compiled"].append([kernel.__name__, str(dtype), c, len(compiled.asm["cubin"])])
x, labels = torch.randn(1, 3, 8), torch.randint(0, 3, (1, 8))
os.environ[_triton.ENV_VAR] = "auto"
_triton.TRITON_DEVICES.add("cpu")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = _fused.fused_label_terms(x, labels, None, softmax=True, with_ce=True)
    _fused.fused_label_terms(x, labels, None, softmax=True, with_ce=True)
out["warnings"] = [str(w.message) for w in caught]
os.environ[_triton.ENV_VAR] = "torch"
ref = _fused.fused_label_terms(x, labels, None, softmax=True, with_ce=True)
out["fallback_equal"] = all(torch.equal(a, b) for a, b in zip(got, ref))
os.environ[_triton.ENV_VAR] = "triton"
try:
    _fused.fused_label_terms(x, labels, None, softmax=True)
except ValueError as err:
    out["forced_error"] = str(err)
print(json.dumps(out))
"""

_COMPILE_CASES = [  # (dtype, C, softmax, squared, with_ce, focal kind)
    ("float32", 16, True, False, True, 2), ("float16", 105, True, True, True, 1),
    ("bfloat16", 133, True, False, True, 2), ("float32", 133, False, True, False, 1),
    ("float64", 4, True, True, True, 2), ("float32", 1, False, False, False, 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def without_interpreter():
    """What the script above reports (one fresh interpreter, TRITON_INTERPRET unset)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _triton.ENV_VAR)}
    run = subprocess.run([sys.executable, "-c", _COMPILER_SCRIPT, json.dumps(_COMPILE_CASES)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if run.returncode and "GPUTarget" in run.stderr and "ImportError" in run.stderr:  # pragma: no cover
        pytest.skip("this Triton has no CUDA compiler backend")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_kernels_compile_for_sm90(without_interpreter):
    """Triton's compiler (not the interpreter) builds both kernels to an H100/H200 (sm_90) cubin, for each dtype,
    one and several class tiles, both activations and focal forms: catches what the interpreter lets through (types,
    constexpr use, layouts) without a GPU."""
    compiled = without_interpreter["compiled"]
    assert len(compiled) == 2 * len(_COMPILE_CASES) and all(size > 0 for *_, size in compiled)


@pytest.mark.slow
def test_without_the_interpreter(without_interpreter):
    """No interpreter, CPU tensors: auto mode on a Triton device (CPU added) fails to compile for real, warns once
    with the reason and gives the torch path's terms; forced Triton is a ValueError naming TRITON_INTERPRET."""
    (message,) = without_interpreter["warnings"]
    assert message.startswith("monai_gdl_plus: the Triton kernels did not compile (")
    assert message.endswith("using the torch path (set MONAI_GDL_PLUS_KERNELS=torch to silence).")
    assert without_interpreter["fallback_equal"]
    assert "needs TRITON_INTERPRET=1" in without_interpreter["forced_error"]
