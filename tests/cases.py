"""Seeded test inputs and the host-sync guard, shared by test modules (``from cases import ...``) and by the fixtures
of ``conftest.py``; a plain module, since ``tests/app`` has a ``conftest.py`` of its own and ``from conftest import``
would find whichever was imported first."""

from __future__ import annotations

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
