"""Shared fixtures: seeded random logits and label maps in 2-D and 3-D, and a parity recorder."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter for the Triton kernels' tests (tests/test__triton.py) on machines without a GPU: Triton reads
# it when `triton` is imported (torch._inductor imports it too), so it is set before any test module loads. Nothing
# else runs Triton on CPU tensors (inductor generates C++ there).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from cases import _make_case


@pytest.fixture
def make_case():
    """Factory ``make_case(shape, seed=0, dtype=torch.float64, absent=True) -> (logits, labels)``."""
    return _make_case


@pytest.fixture(params=[(2, 4, 6, 6, 6), (2, 3, 8, 8)], ids=["3d", "2d"])
def case(request):
    """Seeded float64 logits and labels, 3-D (2, 4, 6, 6, 6) and 2-D (2, 3, 8, 8)."""
    return _make_case(request.param)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests: on 2 shared cores OpenMP hand-offs dominate otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ParityRecord:
    """Largest value and gradient deviation from MONAI seen in this session, per comparison family."""

    def __init__(self) -> None:
        self.cases: dict[str, int] = {}
        self.value: dict[str, float] = {}
        self.grad: dict[str, float] = {}

    def add(self, family: str, value_dev: float, grad_dev: float) -> None:
        self.cases[family] = self.cases.get(family, 0) + 1
        self.value[family] = max(self.value.get(family, 0.0), value_dev)
        self.grad[family] = max(self.grad.get(family, 0.0), grad_dev)


@pytest.fixture(scope="session")
def parity_record():
    """Collects deviations from MONAI; prints a summary at the end of the session (visible with ``-s``)."""
    record = ParityRecord()
    yield record
    if record.cases:
        print("\nParity with MONAI (cases, max |value diff|, max |grad diff|):")
        for fam, n in sorted(record.cases.items()):
            print(f"  {fam:<28} {n:5d}  {record.value[fam]:.3e}  {record.grad[fam]:.3e}")
        total = sum(record.cases.values())
        print(f"  {'all':<28} {total:5d}  {max(record.value.values()):.3e}  {max(record.grad.values()):.3e}")


class AutocastRecord:
    """Largest deviation per family and quantity under autocast (see test_losses.py, section 1b)."""

    def __init__(self) -> None:
        self.cases: dict[str, int] = {}
        self.worst: dict[str, dict[str, float]] = {}

    def add(self, family: str, deviations: dict[str, float]) -> None:
        self.cases[family] = self.cases.get(family, 0) + 1
        worst = self.worst.setdefault(family, {})
        for k, v in deviations.items():
            worst[k] = max(worst.get(k, 0.0), v)


@pytest.fixture(scope="session")
def autocast_record():
    """Collects deviations under autocast; prints a table at the end of the session (visible with ``-s``)."""
    record = AutocastRecord()
    yield record
    if record.cases:
        keys = list(next(iter(record.worst.values())))
        print("\nUnder CPU autocast (max |value diff|; gradient: max |diff| / max |grad|):")
        print("| family | cases | " + " | ".join(keys) + " |")
        print("|---|---:|" + "---:|" * len(keys))
        for fam, n in record.cases.items():
            print(f"| {fam} | {n} | " + " | ".join(f"{record.worst[fam][k]:.1e}" for k in keys) + " |")
