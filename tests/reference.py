"""A slow, obvious reference for the Dice-family losses, written from the papers' formulas.

Nothing here is shared with :mod:`monai_gdl_plus`: Python loops over samples and classes, a dense one-hot built by
plain indexing, and each rule of ``DESIGN.md`` spelled out where it applies. The losses are compared with it.

Formulas (``I = sum(p g)``, ``P = sum(p)`` or ``sum(p**2)``, ``G = sum(g)`` or ``sum(g**2)``, ``D = P + G``):

- Dice (Milletari et al. 2016, V-Net; squared denominator with ``squared_pred``): ``1 - (2I + s_nr) / (D + s_dr)``.
- Jaccard (MONAI 1.6.1 form): ``1 - (2I + s_nr) / (2(D - I) + s_dr)``.
- Generalised Dice (Sudre et al. 2017): the same with ``I`` and ``D`` replaced by ``sum_c w_c I_c`` and
  ``sum_c w_c D_c``, ``w_c = 1/V_c**2`` ("square"), ``1/V_c`` ("simple") or 1 ("uniform"), ``V_c = sum(g_c)``.

Everything is plain differentiable torch, so gradients can be compared as well as values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "one_hot",
    "activate",
    "prepare",
    "terms",
    "label_counts",
    "gdl_weights",
    "cross_entropy",
    "dice_loss",
    "generalized_dice_loss",
]


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense one-hot (B, C, *S) of a label map (B, *S) by plain indexing; labels outside [0, C) give all-zero rows."""
    out = torch.zeros((labels.shape[0], num_classes, *labels.shape[1:]), dtype=dtype, device=labels.device)
    for c in range(num_classes):
        out[:, c][labels == c] = 1.0
    return out


def activate(x: torch.Tensor, sigmoid: bool, softmax: bool, other_act: Callable | None) -> torch.Tensor:
    """Activation along channels; softmax of one channel is skipped with a warning (as MONAI does)."""
    x = x.double() if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x
    if sigmoid:
        return 1.0 / (1.0 + torch.exp(-x))
    if softmax:
        if x.shape[1] == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=2)
            return x
        e = torch.exp(x - x.amax(1, keepdim=True))
        return e / e.sum(1, keepdim=True)
    if other_act is not None:
        return other_act(x)
    return x


def prepare(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool,
    to_onehot_y: bool,
    sigmoid: bool,
    softmax: bool,
    other_act: Callable | None,
    ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]:
    """Masked probabilities and target (B, C, N) in float64, the voxel mask (B, N), the kept channels, the labels.

    Ignored voxels: label-map target == ignore_index; a one-channel dense target == ignore_index; a one-hot target
    with ignore_index in [0, C): voxels of that class; outside: voxels whose one-hot row is all zero (MONAI's rules).
    Kept channels: background dropped without ``include_background``; an in-range ``ignore_index`` channel dropped.
    """
    b, c = input.shape[:2]
    p = activate(input, sigmoid, softmax, other_act).reshape(b, c, -1)
    labels = None
    if to_onehot_y and c > 1:
        labels = target.reshape(b, -1).long()
        g = one_hot(labels, c)
        mask = torch.ones(b, labels.shape[1], dtype=torch.float64)
        if ignore_index is not None:
            mask[labels == ignore_index] = 0.0
    else:
        g = target.reshape(b, c, -1).double()
        mask = torch.ones(b, g.shape[2], dtype=torch.float64)
        if ignore_index is not None:
            if c == 1:
                mask[g[:, 0] == ignore_index] = 0.0
            elif 0 <= ignore_index < c:
                mask[g[:, ignore_index] > 0] = 0.0
            else:
                mask[g.sum(1) == 0] = 0.0
    p = p * mask[:, None]
    g = g * mask[:, None]
    start = 1 if (not include_background and c > 1) else 0
    keep = [k for k in range(start, c) if not (ignore_index is not None and c > 1 and k == ignore_index)]
    return p, g, mask, keep, labels


def terms(p: torch.Tensor, g: torch.Tensor, squared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(sample, class) I, P, G of (B, C, N) tensors with a Python loop over both axes; returns (B, C) each."""
    b, c = p.shape[:2]
    inter = torch.zeros(b, c, dtype=p.dtype)
    psum = torch.zeros(b, c, dtype=p.dtype)
    gsum = torch.zeros(b, c, dtype=p.dtype)
    for i in range(b):
        for k in range(c):
            pk, gk = p[i, k], g[i, k].to(p.dtype)
            inter[i, k] = (pk * gk).sum()
            psum[i, k] = (pk * pk).sum() if squared else pk.sum()
            gsum[i, k] = (gk * gk).sum() if squared else gk.sum()
    return inter, psum, gsum


def label_counts(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard counts (TP, predicted, true) per (sample, class) from two label maps, ignored target voxels left out."""
    b = pred.shape[0]
    p, t = pred.reshape(b, -1), target.reshape(b, -1)
    tp = torch.zeros(b, num_classes, dtype=torch.long)
    np_ = torch.zeros(b, num_classes, dtype=torch.long)
    nt = torch.zeros(b, num_classes, dtype=torch.long)
    for i in range(b):
        for n in range(p.shape[1]):
            ti, pi = int(t[i, n]), int(p[i, n])
            if ignore_index is not None and ti == ignore_index:
                continue
            np_[i, pi] += 1
            nt[i, ti] += 1
            tp[i, ti] += int(pi == ti)
    return tp, np_, nt


def _ratio(inter, denom, smooth_nr: float, smooth_dr: float, jaccard: bool):
    if jaccard:
        return 1.0 - (2.0 * inter + smooth_nr) / (2.0 * (denom - inter) + smooth_dr)
    return 1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)


def _full_weight(weight, num_classes: int, include_background: bool) -> torch.Tensor | None:
    """Static weights, one per class: a scalar for all; length C as given; length C-1 (no background) gets 1 first."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float64)
    if w.ndim == 0:
        return w.repeat(num_classes)
    if w.shape[0] == num_classes:
        return w
    if not include_background and w.shape[0] == num_classes - 1:
        return torch.cat([torch.ones(1, dtype=torch.float64), w])
    raise ValueError(f"bad weight length {w.shape[0]} for {num_classes} classes")


def gdl_weights(
    volumes: Sequence[float],
    w_type: str = "square",
    absent_weight: str | float = "max",
    static: Sequence[float] | None = None,
    normalize: bool = True,
) -> list[float]:
    """Generalised Dice weights of one sample (or of the batch), as Python floats, rule by rule.

    1. volume weights of present classes; 2. absent classes: max of present / 0 / the given raw weight;
    3. if no class is present: every weight 1; 4. times the static weights; 5. divided by their sum if normalize.
    """
    vols = [float(v) for v in volumes]
    present = [v > 0 for v in vols]

    def vw(v: float) -> float:
        return {"square": 1.0 / (v * v), "simple": 1.0 / v, "uniform": 1.0}[w_type] if v > 0 else 0.0

    w = [vw(v) for v in vols]
    if any(present):
        if absent_weight == "max":
            fill = max(wi for wi, pr in zip(w, present, strict=False) if pr)
        elif absent_weight == "zero":
            fill = 0.0
        else:
            fill = float(absent_weight)
        w = [wi if pr else fill for wi, pr in zip(w, present, strict=False)]
    else:
        w = [1.0] * len(w)
    if static is not None:
        w = [wi * float(s) for wi, s in zip(w, static, strict=False)]
    if normalize:
        total = sum(w)
        w = [wi / total for wi in w] if total > 0 else w
    return w


def cross_entropy(
    input: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    sigmoid: bool,
    class_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Mean cross entropy over the voxels that count (``mask``), in float64, one class at a time.

    Softmax CE (C > 1, no sigmoid): per voxel ``-sum_c w_c g_c log p_c``; for a label map the mean is weighted by
    ``w_y`` (PyTorch's weighted mean), for a one-hot target it is over voxels. BCE (sigmoid or C = 1): per channel
    ``-(pw_c g log s(x) + (1 - g) log(1 - s(x)))``, averaged over voxels x channels.
    """
    b, c = input.shape[:2]
    x = input.double().reshape(b, c, -1)
    w = torch.ones(c, dtype=torch.float64) if class_weight is None else class_weight
    total = torch.zeros((), dtype=torch.float64)
    if sigmoid or c == 1:
        for k in range(c):
            s = torch.sigmoid(x[:, k])
            per_voxel = -(w[k] * g[:, k] * torch.log(s) + (1 - g[:, k]) * torch.log(1 - s))
            total = total + (per_voxel * mask).sum()
        return total / (mask.sum() * c).clamp_min(1.0)
    logp = x - torch.logsumexp(x, 1, keepdim=True)
    count = torch.zeros((), dtype=torch.float64)
    for k in range(c):
        total = total - (w[k] * g[:, k] * logp[:, k] * mask).sum()
        count = count + w[k] * (g[:, k] * mask).sum()
    if labels is None:
        count = mask.sum()
    return total / count


def tversky_terms(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Salehi et al. 2017 per (sample, class): true positives sum(p g), false positives sum(p (1 - g)), false
    negatives sum((1 - p) g), with a Python loop over both axes; masked voxels (p = g = 0) add nothing."""
    b, c = p.shape[:2]
    tp, fp, fn = (torch.zeros(b, c, dtype=p.dtype) for _ in range(3))
    for i in range(b):
        for k in range(c):
            pk, gk = p[i, k], g[i, k].to(p.dtype)
            tp[i, k], fp[i, k], fn[i, k] = (pk * gk).sum(), (pk * (1 - gk)).sum(), ((1 - pk) * gk).sum()
    return tp, fp, fn


def _tversky(tp, fp, fn, alpha: float, beta: float, smooth_nr: float, smooth_dr: float):
    return 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)


def focal_loss(
    input: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor,
    keep: list[int],
    *,
    gamma: float,
    alpha: float | None,
    softmax: bool,
    class_weight: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """Lin et al. 2017, ``FL(p_t) = -alpha_t (1 - p_t)**gamma log(p_t)``, element by element in float64.

    Sigmoid form: every (class, voxel) is a binary problem, ``p_t = p`` where ``g = 1`` and ``1 - p`` where ``g = 0``,
    ``alpha_t = alpha`` or ``1 - alpha``. Softmax form: only the true class counts, ``p_t`` its softmax probability,
    ``alpha_t = 1 - alpha`` for class 0 and ``alpha`` otherwise. Kept classes only, counted voxels only; ``"mean"``
    over (sample, kept class, counted voxel), ``"sum"`` of the per-(sample, class) means over counted voxels.
    """
    b, c = input.shape[:2]
    x = input.double().reshape(b, c, -1)
    p = torch.softmax(x, 1) if softmax else torch.sigmoid(x)
    sums = torch.zeros(b, len(keep), dtype=torch.float64)
    for i in range(b):
        for j, k in enumerate(keep):
            for n in range(x.shape[2]):
                if mask[i, n] == 0:
                    continue
                t = float(g[i, k, n])
                if softmax and t == 0:
                    continue
                pt = p[i, k, n] if t == 1 else 1 - p[i, k, n]
                a = 1.0 if alpha is None else (alpha if (k > 0 if softmax else t == 1) else 1 - alpha)
                w = 1.0 if class_weight is None else float(class_weight[k])
                sums[i, j] = sums[i, j] - w * a * (1 - pt) ** gamma * torch.log(pt)
    counts = mask.sum(1)
    if reduction == "sum":
        return (sums / counts[:, None]).sum()
    return sums.sum() / (counts.sum() * len(keep))


def _reduce(f: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"mean": f.mean, "sum": f.sum, "none": lambda: f}[reduction]()


def dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    squared_pred: bool = False,
    jaccard: bool = False,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    weight=None,
    ignore_index: int | None = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 0.0,
    tversky: tuple[float, float] | None = None,
    lambda_focal: float = 0.0,
    gamma: float = 2.0,
    focal_alpha: float | None = None,
    focal_softmax: bool = False,
    focal_weight=None,
) -> torch.Tensor:
    """Reference Dice or Tversky (+ CE). ``reduction="none"`` gives (B, C') or (C',) with ``batch``."""
    c = input.shape[1]
    p, g, mask, keep, labels = prepare(
        input, target, include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
        softmax=softmax, other_act=other_act, ignore_index=ignore_index,
    )  # fmt: skip
    inter, psum, gsum = terms(p, g, squared_pred)
    tp, fp, fn = tversky_terms(p, g)
    if batch:
        inter, psum, gsum = inter.sum(0, keepdim=True), psum.sum(0, keepdim=True), gsum.sum(0, keepdim=True)
        tp, fp, fn = tp.sum(0, keepdim=True), fp.sum(0, keepdim=True), fn.sum(0, keepdim=True)
    full_w = _full_weight(weight, c, include_background)
    f = torch.zeros(inter.shape[0], len(keep), dtype=torch.float64)
    for i in range(inter.shape[0]):
        for j, k in enumerate(keep):
            if tversky is not None:
                f[i, j] = _tversky(tp[i, k], fp[i, k], fn[i, k], *tversky, smooth_nr, smooth_dr)
            else:
                f[i, j] = _ratio(inter[i, k], psum[i, k] + gsum[i, k], smooth_nr, smooth_dr, jaccard)
            # MONAI's rule: no class weight when one class is scored, counted before an in-range ignore drop
            if full_w is not None and (c if include_background or c == 1 else c - 1) != 1:
                f[i, j] = f[i, j] * full_w[k]
    if batch:
        f = f[0]
    out = lambda_dice * _reduce(f, reduction)
    if lambda_ce:
        out = out + lambda_ce * cross_entropy(input, g, mask, labels, sigmoid=sigmoid, class_weight=full_w)
    if lambda_focal:
        fw = full_w if focal_weight is None else _full_weight(focal_weight, c, include_background)
        out = out + lambda_focal * focal_loss(input, g, mask, keep, gamma=gamma, alpha=focal_alpha,
                                              softmax=focal_softmax, class_weight=fw, reduction=reduction)  # fmt: skip
    return out


def generalized_dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    w_type: str = "square",
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    squared_pred: bool = False,
    jaccard: bool = False,
    weight=None,
    ignore_index: int | None = None,
    absent_weight: str | float = "max",
    normalize_weights: bool = True,
    lambda_dice: float = 1.0,
    lambda_ce: float = 0.0,
    tversky: tuple[float, float] | None = None,
    lambda_focal: float = 0.0,
    gamma: float = 2.0,
    focal_alpha: float | None = None,
    focal_softmax: bool = False,
    focal_weight=None,
) -> torch.Tensor:
    """Reference Generalised Dice or generalised Tversky (the class weights on TP, FP and FN) (+ CE).
    ``reduction="none"`` gives (B,) or a 0-d tensor with ``batch``."""
    c = input.shape[1]
    p, g, mask, keep, labels = prepare(
        input, target, include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
        softmax=softmax, other_act=other_act, ignore_index=ignore_index,
    )  # fmt: skip
    inter, psum, gsum = terms(p, g, squared_pred)
    _, _, vol = terms(p, g, False)  # weights always use the linear volume sum(g)
    tp, fp, fn = tversky_terms(p, g)
    if batch:
        inter, psum, gsum, vol, tp, fp, fn = (t.sum(0, keepdim=True) for t in (inter, psum, gsum, vol, tp, fp, fn))
    full_w = _full_weight(weight, c, include_background)
    static = None if full_w is None else [float(full_w[k]) for k in keep]
    f = torch.zeros(inter.shape[0], dtype=torch.float64)
    for i in range(inter.shape[0]):
        w = gdl_weights([vol[i, k] for k in keep], w_type, absent_weight, static, normalize_weights)
        num = sum(w[j] * inter[i, k] for j, k in enumerate(keep))
        den = sum(w[j] * (psum[i, k] + gsum[i, k]) for j, k in enumerate(keep))
        f[i] = _ratio(num, den, smooth_nr, smooth_dr, jaccard)
        if tversky is not None:
            wtp, wfp, wfn = (sum(w[j] * t[i, k] for j, k in enumerate(keep)) for t in (tp, fp, fn))
            f[i] = _tversky(wtp, wfp, wfn, *tversky, smooth_nr, smooth_dr)
        if not any(float(vol[i, k]) > 0 for k in keep):
            # empty rule: the soft count of false-positive voxels S against one voxel, S / (S + 1)
            s_fp = sum(psum[i, k] for k in keep)
            f[i] = s_fp / (s_fp + 1.0)
    if batch:
        f = f[0]
    out = lambda_dice * _reduce(f, reduction)
    if lambda_ce:
        out = out + lambda_ce * cross_entropy(input, g, mask, labels, sigmoid=sigmoid, class_weight=full_w)
    if lambda_focal:
        fw = full_w if focal_weight is None else _full_weight(focal_weight, c, include_background)
        out = out + lambda_focal * focal_loss(input, g, mask, keep, gamma=gamma, alpha=focal_alpha,
                                              softmax=focal_softmax, class_weight=fw, reduction=reduction)  # fmt: skip
    return out
