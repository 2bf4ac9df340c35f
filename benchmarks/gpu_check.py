"""GPU checks for a lent accelerator (never run by CI): sync-free training steps (float32, float16 AMP, compiled,
deterministic), CUDA parity with MONAI, AMP against float32, and the per-class Dice metric's update without host
syncs.

    python benchmarks/gpu_check.py

Into a GPU image's own Python (e.g. Python 3.12 with torch 2.11 and Triton 3.6, no MONAI or Ignite), install the
package beside the image's torch with ``--no-deps`` throughout, so pip can never replace torch; MONAI and Ignite
travel as wheels (``pip download --no-deps monai==1.6.1 pytorch-ignite==0.5.5 -d wheels`` where PyPI is reachable)::

    pip install --no-deps --no-index wheels/monai-1.6.1-py3-none-any.whl wheels/pytorch_ignite-0.5.5-py3-none-any.whl
    pip install --no-deps --no-build-isolation --no-index .    # from the source tree's root, offline
    pip check && python benchmarks/gpu_check.py

``--no-build-isolation`` builds with the image's own setuptools (>= 77; torch 2.11 on Python 3.12 brings 81), so
nothing is downloaded; with PyPI reachable, plain ``pip install --no-deps .`` does as well. Checked with torch
2.11.0 (CUDA build) on Python 3.12 (2026-12-03): torch stays 2.11, ``pip check`` finds nothing broken.

Prints one line per check and exits non-zero if any fails. Timing and memory against MONAI/nnU-Net on CUDA come
from ``gdl-plus bench --device cuda`` (``monai_gdl_plus.app.bench``).
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings

import torch
from monai.losses import DiceCELoss, DiceLoss, GeneralizedDiceLoss

from monai_gdl_plus import DicePlusLoss, GeneralizedDicePlusLoss

KERNELS_WITHIN_S = 250.0  # with --kernels: gpu_kernels.py gets what is left of this (at least 60 s)


def _sync_free_step(loss_fn: torch.nn.Module, shape: tuple[int, ...], ignore: int | None, amp: bool = False) -> str:
    """One conv + loss forward/backward + SGD step under ``set_sync_debug_mode("error")`` (``amp``: the network
    and the loss under float16 autocast, as MONAI's trainers run them)."""
    dev = torch.device("cuda")
    b, c = shape[:2]
    net = torch.nn.Conv3d(1, c, 3, padding=1).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    img = torch.randn(b, 1, *shape[2:], device=dev)
    lab = torch.randint(0, c, (b, 1, *shape[2:]), device=dev)
    if ignore is not None:
        lab[:, :, :2] = ignore
    loss_fn = loss_fn.to(dev)
    for step in range(3):  # the first steps warm up kernels and the allocator outside the check
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            logits = net(img)
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:  # only the loss's forward and backward are under the check
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = loss_fn(logits, lab)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.step()
    return f"loss={float(loss):.4f}"


def check_sync_free() -> bool:
    ok = True
    cases = [
        ("DicePlusLoss softmax", DicePlusLoss(to_onehot_y=True, softmax=True), None),
        ("DicePlusLoss softmax+CE ignore=255", DicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=1.0,
                                                            ignore_index=255), 255),  # fmt: skip
        ("DicePlusLoss sigmoid squared", DicePlusLoss(to_onehot_y=True, sigmoid=True, squared_pred=True), None),
        ("GDL softmax", GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True), None),
        ("GDL softmax no-bg ignore=2 +CE w", GeneralizedDicePlusLoss(
            to_onehot_y=True, softmax=True, include_background=False, ignore_index=2, lambda_ce=0.5,
            weight=[1.0, 2.0, 3.0, 4.0]), 2),  # fmt: skip
        ("GDL batch jaccard", GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True, batch=True, jaccard=True), None),
    ]
    compiled = [(f"{name} [compiled]", torch.compile(fn, fullgraph=True), ig) for name, fn, ig in cases[:2]]
    for (name, fn, ignore), amp in itertools.product(cases + compiled, (False, True)):
        label = name + (" [amp fp16]" if amp else "")
        try:
            msg = _sync_free_step(fn, (2, 4, 32, 32, 32), ignore, amp)
            print(f"[ok]   sync-free step: {label}: {msg}")
        except RuntimeError as e:
            ok = False
            print(f"[FAIL] sync-free step: {label}: {str(e).splitlines()[0][:300]}")
    torch.use_deterministic_algorithms(True)
    try:
        msg = _sync_free_step(cases[1][1], (2, 4, 32, 32, 32), 255, amp=True)
        print(f"[ok]   deterministic algorithms: {cases[1][0]} [amp fp16]: {msg}")
    except RuntimeError as e:
        ok = False
        print(f"[FAIL] deterministic algorithms: {str(e).splitlines()[0][:300]}")
    finally:
        torch.use_deterministic_algorithms(False)
    return ok


def check_amp() -> bool:
    """Under float16 autocast, value equal to float32 on the rounded logits, at class volumes past 65504."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(2, 4, 64, 64, 64, device=dev).half()
    y = torch.randint(0, 4, (2, 1, 64, 64, 64), device=dev)
    worst = 0.0
    for fn in (DicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=1.0), GeneralizedDicePlusLoss(
            to_onehot_y=True, softmax=True), DicePlusLoss(to_onehot_y=True, sigmoid=True, squared_pred=True)):
        expected = fn(x.float(), y)
        with torch.autocast("cuda", dtype=torch.float16):
            got = fn(x, y)
        worst = max(worst, float((got - expected).abs()))
    good = worst <= 1e-5
    print(f"[{'ok' if good else 'FAIL'}]   float16 AMP vs float32 on the rounded logits: max |diff| = {worst:.2e}")
    return good


def check_parity() -> bool:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16, 16, device=dev, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 1, 16, 16, 16), device=dev)
    worst = 0.0
    n = 0
    grid = itertools.product([True, False], [True, False], [True, False], [True, False], ["softmax", "sigmoid"])
    for inc_bg, squared, batch, jaccard, act in grid:
        kw = dict(include_background=inc_bg, to_onehot_y=True, batch=batch, **{act: True})
        pairs = [
            (DiceLoss(squared_pred=squared, jaccard=jaccard, **kw),
             DicePlusLoss(squared_pred=squared, jaccard=jaccard, **kw)),  # fmt: skip
            (GeneralizedDiceLoss(**kw), GeneralizedDicePlusLoss(normalize_weights=False, **kw)),
        ]
        if act == "softmax":
            pairs.append((DiceCELoss(squared_pred=squared, jaccard=jaccard, **kw),
                          DicePlusLoss(squared_pred=squared, jaccard=jaccard, lambda_ce=1.0, **kw)))  # fmt: skip
        for ref, ours in pairs:
            xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                la, lb = ref(xa, y), ours(xb, y)
            la.backward()
            lb.backward()
            worst = max(worst, float((la - lb).abs()), float((xa.grad - xb.grad).abs().max()))
            n += 1
    good = worst <= 1e-5
    print(f"[{'ok' if good else 'FAIL'}]   CUDA parity with MONAI: {n} cases, max |value or grad diff| = {worst:.2e}")
    return good


def check_metric_sync_free() -> bool:
    from monai_gdl_plus import PerClassDice

    dev = torch.device("cuda")
    x = torch.randn(2, 4, 32, 32, 32, device=dev)
    y = torch.randint(0, 4, (2, 1, 32, 32, 32), device=dev)
    ok = True
    for kw in ({}, {"aggregation": "per_image"}, {"activation": "sigmoid"}, {"ignore_index": 255}):
        m = PerClassDice(4, device=dev, **kw)
        m.update((x, y))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m.update((x, y))
            res = "no sync"
        except RuntimeError as e:
            ok, res = False, f"SYNC: {str(e).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        cpu = PerClassDice(4, **kw)
        cpu.update((x.cpu(), y.cpu()))
        cpu.update((x.cpu(), y.cpu()))
        pairs = zip(m.compute().values(), cpu.compute().values(), strict=False)
        same = all((a != a and b != b) or abs(a - b) < 1e-9 for a, b in pairs)
        ok = ok and same
        print(f"[{'ok' if res == 'no sync' and same else 'FAIL'}]   PerClassDice.update {kw}: {res}, cuda==cpu: {same}")
    return ok


def main(argv: list[str] | None = None) -> int:
    # --kernels [gpu_kernels.py's options]: then the Triton kernels' checks and timing table (gpu_kernels.py), within
    # what is left of KERNELS_WITHIN_S since this started, so that one command stays under 5 minutes
    argv = sys.argv[1:] if argv is None else argv
    start = time.monotonic()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    results = [check_sync_free(), check_parity(), check_amp(), check_metric_sync_free()]
    if "--kernels" in argv:
        import gpu_kernels

        rest = [a for a in argv if a != "--kernels"]
        budget = max(60.0, KERNELS_WITHIN_S - (time.monotonic() - start))
        results.append(gpu_kernels.main([*rest, "--budget", f"{budget:.0f}"]) == 0)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
