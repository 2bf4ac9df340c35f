"""Seeded test inputs, the host-sync guard and the small helpers (targets, ignored voxels, class weights, value
and gradient, agreement with the reference) shared by test modules (``from cases import ...``) and by the fixtures
of ``conftest.py``; a plain module, since ``tests/app`` has a ``conftest.py`` of its own and ``from conftest import``
would find whichever was imported first."""

from __future__ import annotations

import reference as R
import torch


def _make_case(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64, absent: bool = True):
    """Logits (B, C, *S) with ``requires_grad`` and an int64 label map (B, 1, *S).

    With ``absent`` and B > 1, the last class is missing from the last sample (exercises the absent-class rules).
    """
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    logits = (2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, c, (b, 1, *shape[2:]), generator=g)
    if absent and b > 1 and c > 2:
        labels[-1][labels[-1] == c - 1] = 0
    return logits, labels


def forbid_host_syncs(monkeypatch) -> None:
    """Make every call that would wait for an accelerator raise: reading a tensor on the host, ``bincount``
    (sizes its output from the data), ``unique`` and ``nonzero`` (data-dependent shapes). Use with
    ``_ops.HOST_DEVICES`` emptied, so that CPU tensors take the accelerator code paths."""

    def sync(*args, **kwargs):
        raise AssertionError("host sync in accelerator mode")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for name in ("bincount", "unique", "nonzero"):
        monkeypatch.setattr(torch, name, sync)


SHAPES = {"3d": (2, 4, 6, 6, 6), "2d": (2, 3, 8, 8)}


def _target(labels: torch.Tensor, num_classes: int, kind: str) -> torch.Tensor:
    """The label map itself, or its one-hot (labels outside [0, C) give all-zero rows: MONAI's sentinel rule)."""
    return labels if kind == "label" else R.one_hot(labels[:, 0], num_classes)


def _with_ignored(labels: torch.Tensor, value: int, seed: int = 1, fraction: float = 0.2) -> torch.Tensor:
    """A copy of ``labels`` with a random ``fraction`` of voxels set to ``value``."""
    g = torch.Generator().manual_seed(seed)
    out = labels.clone()
    out[torch.rand(labels.shape, generator=g) < fraction] = value
    return out


def _class_weight(n: int, dtype=torch.float64) -> torch.Tensor:
    return torch.linspace(0.3, 1.0, n, dtype=dtype)


def _weight_for(kind, c):
    return {None: None, "short": _class_weight(c - 1), "full": _class_weight(c)}[kind]


def _value_and_grad(loss, x: torch.Tensor, y: torch.Tensor, shape=None):
    """Loss value (reshaped to ``shape``) and d(sum(value * cotangent))/dx with a fixed non-uniform cotangent."""
    xi = x.detach().clone().requires_grad_(True)
    v = loss(xi, y)
    if shape is not None:
        v = v.reshape(shape)
    cot = torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype).reshape(v.shape) if v.numel() > 1 else torch.ones_like(v)
    (grad,) = torch.autograd.grad((v * cot).sum(), xi)
    return v.detach(), grad


def _assert_matches_reference(ours, ref, x, y, atol=1e-9):
    a, ga = _value_and_grad(ours, x, y)
    b, gb = _value_and_grad(ref, x, y)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=1e-7)
    torch.testing.assert_close(ga, gb.to(ga.dtype), atol=atol, rtol=1e-7)
