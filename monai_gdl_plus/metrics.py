"""Per-class Dice as an Ignite metric, with constant memory and exact DDP reduction.

:class:`PerClassDice` turns each batch into hard per-class counts (true positives, predicted voxels, true voxels per
sample and class) with the functional core (:func:`monai_gdl_plus.functional.label_terms` for mutually exclusive
classes, :func:`monai_gdl_plus.functional.per_class_terms` for multi-label sigmoid outputs) and keeps only per-class
sums, so ``compute()`` after an ``all_reduce`` of those sums is exact under ``ignite.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from monai_gdl_plus._ops import autocast_off
from monai_gdl_plus.functional import (
    check_binary,
    check_integer_labels,
    dense_ignore_mask,
    label_map,
    label_terms,
    plain_tensor,
    soft_terms,
)
from monai_gdl_plus.options import check_option

__all__ = ["PerClassDice", "ACTIVATIONS", "AGGREGATIONS"]

ACTIVATIONS = ("softmax", "sigmoid")
AGGREGATIONS = ("global", "per_image")

# voxels per chunk for the CPU argmax: keeps the (B, C, chunk) temporaries in cache and out of fresh mmapped pages
_CPU_CHUNK = 1 << 16
# float32 sums of 0/1 values are exact below 2**24 per (sample, class)
_EXACT_FLOAT32 = 1 << 24


def _argmax_channels(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(1)`` flattened to (B, N) int64, with argmax's tie-breaking (the first maximal channel).

    ``torch.argmax`` over the channel axis is slow on CPU; this takes the channel maximum, marks the maximal
    channels, and keeps the first one as the largest *reversed* channel id. On CPU it runs over chunks of voxels
    so the temporaries stay small. A NaN voxel gets the last class.
    """
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    n = flat.shape[2]
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    out = torch.empty(b, n, dtype=torch.long, device=x.device)
    if c == 1:
        return out.zero_()
    rev_dtype = torch.uint8 if c <= 256 else torch.int32
    rev = torch.arange(c - 1, -1, -1, dtype=rev_dtype, device=x.device).view(1, c, 1)
    chunk = _CPU_CHUNK if x.device.type == "cpu" else max(n, 1)
    for s in range(0, n, chunk):
        part = flat[:, :, s : s + chunk]
        top = part.amax(1, keepdim=True)
        first = ((part == top) * rev).amax(1)
        torch.sub(c - 1, first, out=out[:, s : s + chunk])
    return out


class PerClassDice(Metric):
    """Per-class Dice over an epoch, as an Ignite metric, for MONAI and plain Ignite engines.

    For class ``c``, with ``TP``, ``P`` and ``G`` the true-positive, predicted and true voxel counts,
    ``Dice_c = 2 TP_c / (P_c + G_c)``. ``aggregation="global"`` sums the counts over every image of the epoch
    before dividing (nnU-Net's "pseudo Dice", torchmetrics' ``aggregation_level="global"``);
    ``aggregation="per_image"`` averages the Dice of each image in which the class is defined.

    Undefined values are NaN, never 0 or 1: a class absent from both prediction and target (over the epoch for
    ``"global"``, in every image for ``"per_image"``) is NaN, and ``mean`` is the NaN-mean of the reported classes
    (NaN when all are). Per image, Dice is defined when the class is in the prediction *or* the target: an image
    whose target lacks the class but whose prediction has it scores 0 (MONAI's ``DiceMetric(ignore_empty=True)``
    gives NaN there instead, and 1.0 with ``ignore_empty=False`` when both are empty).

    Inputs, by ``activation``:

    - ``"softmax"``: ``y_pred`` logits or probabilities ``(B, C, *spatial)``; the predicted class is the argmax over
      channels (the softmax itself is never computed: it does not change the argmax).
    - ``"sigmoid"``: ``y_pred`` logits ``(B, C, *spatial)``; channel ``c`` is predicted where
      ``sigmoid(y_pred) >= threshold`` (MONAI's ``AsDiscrete(threshold=...)``), classes may overlap.
    - ``None``: ``y_pred`` is already discrete: a label map ``(B, 1, *spatial)``/``(B, *spatial)``, or one-hot (or
      probabilities) ``(B, C, *spatial)`` reduced by argmax.

    ``y`` is a label map ``(B, 1, *spatial)``/``(B, *spatial)`` or one-hot ``(B, C, *spatial)`` (multi-label binary
    channels with ``"sigmoid"``). A label map is never expanded to one-hot. Tensors may be MONAI ``MetaTensor`` s,
    and ``y_pred``/``y`` may be the lists of per-sample tensors that MONAI decollates into (what
    ``monai.handlers.from_engine(["pred", "label"])`` returns in a ``SupervisedEvaluator``). Label maps without a
    channel axis are recognised from the spatial shapes; when a shape is ambiguous (first spatial size equal to
    ``num_classes`` or 1), pass ``(B, 1, *spatial)``.

    ``ignore_index`` voxels (where the target equals it) are left out of every count, prediction included. For a
    one-hot ``y`` an ``ignore_index`` in [0, C) marks voxels whose channel ``ignore_index`` is on, and one outside
    marks all-zero voxels (the rule of :mod:`monai_gdl_plus.functional`, taken from MONAI). A class equal to
    ``ignore_index`` is not reported.

    ``compute()`` returns ``{f"{prefix}/{name}": float, ..., f"{prefix}/mean": float}``. When attached, those keys
    go straight into ``engine.state.metrics`` (flattened, no nested dict under the attach name), so MONAI's
    ``StatsHandler``, ``TensorBoardStatsHandler`` and ``MLFlowHandler`` log every class. Keep a scalar key metric
    beside it (MONAI's ``MeanDice``, or ``MetricsLambda(lambda d: d["dice/mean"], metric)``).

    The state is five per-class sums on ``device`` (TP, P, G as int64; the per-image Dice sum as float64 and the
    per-image count as int64) and a sample count: memory is constant and ``compute()`` is exact under DDP.

    Args:
        num_classes: number of classes C, background included (the channel count of a dense ``y_pred``).
        include_background: report class 0. MONAI's meaning: channel 0 is dropped whatever the activation.
        class_names: one name per class 0..C-1 (background included even when not reported); default
            ``"0"``, ``"1"``, ... The reported names must not be ``"mean"``.
        ignore_index: target value whose voxels are left out.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (already discrete).
        threshold: probability threshold of ``"sigmoid"``, in [0, 1].
        aggregation: ``"global"`` or ``"per_image"``.
        prefix: key prefix of the results.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``.
        device: where the state lives (put it on the inputs' device to keep updates free of host syncs).

    Raises:
        ValueError: at construction for a bad class count, names, option string, threshold or prefix; in
            ``update`` for shapes that do not fit or label values outside [0, C) other than ``ignore_index``.
        TypeError: arguments or inputs of the wrong type.
        NotComputableError: ``compute()`` before any ``update``.

    Shapes:
        y_pred ``(B, C, *S)`` | ``(B, 1, *S)`` | ``(B, *S)`` | list of ``(C, *S)``;
        y ``(B, 1, *S)`` | ``(B, *S)`` | ``(B, C, *S)`` | list.

    Examples:
        Two voxels predicted background and liver, both liver in truth: liver Dice ``2 * 1 / (1 + 2)``; the tumour,
        in neither, is NaN and left out of the mean.

        >>> import torch
        >>> from monai_gdl_plus import PerClassDice
        >>> m = PerClassDice(num_classes=3, class_names=["bg", "liver", "tumour"])
        >>> logits = torch.tensor([[[[4.0, 0.0]], [[0.0, 4.0]], [[0.0, 0.0]]]])  # (B=1, C=3, 1, 2)
        >>> m.update((logits, torch.tensor([[[1, 1]]])))  # label map (B, 1, 2)
        >>> {k: round(v, 3) for k, v in m.compute().items()}
        {'dice/liver': 0.667, 'dice/tumour': nan, 'dice/mean': 0.667}

        Attached to an engine, the values land in ``engine.state.metrics`` as scalar keys (here summed over two
        batches: liver ``2 * 1 / (2 + 3)``; the tumour, true in one voxel and never predicted, 0):

        >>> from ignite.engine import Engine
        >>> evaluator = Engine(lambda engine, batch: batch)  # each batch is already (y_pred, y)
        >>> PerClassDice(num_classes=3, class_names=["bg", "liver", "tumour"]).attach(evaluator, "dice")
        >>> state = evaluator.run([(logits, torch.tensor([[[1, 1]]])), (logits, torch.tensor([[[1, 2]]]))])
        >>> state.metrics
        {'dice/liver': 0.4, 'dice/tumour': 0.0, 'dice/mean': 0.2}
    """

    _state_dict_all_req_keys = ("_tp", "_pred_sum", "_true_sum", "_dice_sum", "_dice_count", "_num_samples")

    def __init__(
        self,
        num_classes: int,
        include_background: bool = False,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = None,
        activation: Literal["softmax", "sigmoid"] | None = "softmax",
        threshold: float = 0.5,
        aggregation: Literal["global", "per_image"] = "global",
        prefix: str = "dice",
        output_transform: Callable[[Any], Any] = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.activation = None if activation is None else check_option("activation", activation, ACTIVATIONS)
        self.aggregation = check_option("aggregation", aggregation, AGGREGATIONS)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"`num_classes` must be an int, got {num_classes!r}.")
        min_classes = 1 if self.activation == "sigmoid" else 2
        if num_classes < min_classes:
            raise ValueError(
                f"`num_classes` must be at least {min_classes} with activation={self.activation!r} "
                f"(background included), got {num_classes}."
            )
        if not isinstance(include_background, bool):
            raise TypeError(f"`include_background` must be a bool, got {include_background!r}.")
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {prefix!r}.")
        if not prefix:
            raise ValueError("`prefix` must be a non-empty string, got ''.")
        self.num_classes = num_classes
        self.include_background = include_background
        self.ignore_index = ignore_index
        self.threshold = float(threshold)
        self.prefix = prefix
        self.class_names = self._check_names(class_names, num_classes)
        start = 0 if include_background else 1
        self.reported = tuple(c for c in range(start, num_classes) if c != ignore_index)
        if not self.reported:
            raise ValueError(
                f"no class left to report: num_classes={num_classes}, include_background={include_background}, "
                f"ignore_index={ignore_index}. Use include_background=True for a single-channel output."
            )
        clash = [self.class_names[c] for c in self.reported if self.class_names[c] == "mean"]
        if clash:
            raise ValueError(
                f"`class_names` must not contain 'mean' (the key of the average), got {list(class_names or [])}."
            )
        super().__init__(output_transform=output_transform, device=device)

    @staticmethod
    def _check_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
        if class_names is None:
            return tuple(str(c) for c in range(num_classes))
        if isinstance(class_names, str) or not isinstance(class_names, Sequence):
            raise TypeError(f"`class_names` must be a sequence of strings, got {class_names!r}.")
        names = tuple(class_names)
        if len(names) != num_classes:
            raise ValueError(
                f"`class_names` must have one name per class 0..{num_classes - 1} (num_classes={num_classes}, "
                f"background included), got {len(names)}: {list(names)}."
            )
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"`class_names` must hold non-empty strings, got {list(names)}.")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"`class_names` must be unique, got duplicates {dup} in {list(names)}.")
        return names

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, include_background={self.include_background}, "
            f"class_names={list(self.class_names)}, ignore_index={self.ignore_index}, "
            f"activation={self.activation!r}, threshold={self.threshold}, aggregation={self.aggregation!r}, "
            f"prefix={self.prefix!r}, device={str(self._device)!r})"
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Ignite life-cycle
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def _float64(self) -> torch.dtype:
        # float32 on MPS, which has no float64 (what ignite >= 0.5.2 keeps in its private ``_double_dtype``)
        return torch.float32 if self._device.type == "mps" else torch.float64

    @reinit__is_reduced
    def reset(self) -> None:
        c, dev = self.num_classes, self._device
        self._tp = torch.zeros(c, dtype=torch.long, device=dev)
        self._pred_sum = torch.zeros(c, dtype=torch.long, device=dev)
        self._true_sum = torch.zeros(c, dtype=torch.long, device=dev)
        self._dice_sum = torch.zeros(c, dtype=self._float64, device=dev)
        self._dice_count = torch.zeros(c, dtype=torch.long, device=dev)
        self._num_samples = torch.zeros((), dtype=torch.long, device=dev)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Add one batch ``(y_pred, y)`` (tensors, or lists of per-sample tensors) to the per-class sums."""
        if not isinstance(output, Sequence) or isinstance(output, str) or len(output) != 2:
            raise TypeError(f"`output` must be a pair (y_pred, y), got {type(output).__name__}.")
        y_pred, y = output
        if isinstance(y_pred, (list, tuple)) or isinstance(y, (list, tuple)):
            if not isinstance(y_pred, (list, tuple)) or not isinstance(y, (list, tuple)) or len(y_pred) != len(y):

                def describe(v: Any) -> str:
                    return f"{type(v).__name__}" + (f" of length {len(v)}" if isinstance(v, (list, tuple)) else "")

                raise ValueError(
                    "`y_pred` and `y` must both be tensors or both be lists of per-sample tensors of the same "
                    f"length, got {describe(y_pred)} and {describe(y)}."
                )
            for p, t in zip(y_pred, y, strict=False):
                self._check_tensor(p, "y_pred")
                self._check_tensor(t, "y")
                self._update_batch(p.unsqueeze(0), t.unsqueeze(0))
            return
        self._check_tensor(y_pred, "y_pred")
        self._check_tensor(y, "y")
        self._update_batch(y_pred, y)

    @sync_all_reduce("_tp", "_pred_sum", "_true_sum", "_dice_sum", "_dice_count", "_num_samples")
    def compute(self) -> dict[str, float]:
        """``{f"{prefix}/{name}": Dice, ..., f"{prefix}/mean": NaN-mean}`` over the reported classes.

        Raises:
            NotComputableError: no sample was seen since the last reset (on any process).
        """
        if int(self._num_samples) == 0:
            raise NotComputableError("PerClassDice must have at least one example before it can be computed.")
        nan = float("nan")
        if self.aggregation == "global":
            tp = self._tp.to(torch.float64).cpu()
            denom = (self._pred_sum + self._true_sum).to(torch.float64).cpu()
            dice = torch.where(denom > 0, 2.0 * tp / denom.clamp_min(1.0), torch.full_like(denom, nan))
        else:
            total = self._dice_sum.to(torch.float64).cpu()
            count = self._dice_count.to(torch.float64).cpu()
            dice = torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, nan))
        values = dice.tolist()
        out = {f"{self.prefix}/{self.class_names[c]}": values[c] for c in self.reported}
        defined = [values[c] for c in self.reported if not math.isnan(values[c])]
        out[f"{self.prefix}/mean"] = sum(defined) / len(defined) if defined else nan
        return out

    def completed(self, engine: Engine, name: str) -> None:
        """Put every ``f"{prefix}/..."`` value into ``engine.state.metrics`` as its own scalar key.

        Ignite would also store the whole dict under ``name``; that non-scalar entry is left out on purpose, so
        every consumer of ``engine.state.metrics`` (MONAI's handlers, checkpoint score functions) sees scalars only.
        """
        engine.state.metrics.update(self.compute())

    # ----------------------------------------------------------------------------------------------------------------
    # update internals
    # ----------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_tensor(x: Any, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor (or a list of them), got {type(x).__name__}.")

    def _layout(self, y_pred: torch.Tensor, y: torch.Tensor) -> tuple[str, str]:
        """Decide how to read ``y_pred`` and ``y``: "dense" (B, C, *S), "map" (B, 1, *S) or "bare" (B, *S)."""
        c = self.num_classes

        def forms(x: torch.Tensor, allow_maps: bool) -> list[tuple[str, tuple[int, ...]]]:
            out: list[tuple[str, tuple[int, ...]]] = []
            if x.ndim >= 3 and x.shape[1] == c:
                out.append(("dense", tuple(x.shape[2:])))
            if allow_maps and x.ndim >= 3 and x.shape[1] == 1 and c > 1:
                out.append(("map", tuple(x.shape[2:])))
            if allow_maps and x.ndim >= 2:
                out.append(("bare", tuple(x.shape[1:])))
            return out

        pred_forms = forms(y_pred, allow_maps=self.activation is None)
        true_forms = forms(y, allow_maps=True)
        if y_pred.shape[:1] == y.shape[:1]:
            for pk, ps in pred_forms:
                for tk, ts in true_forms:
                    if ps == ts:
                        return pk, tk
        if self.activation is not None:
            expect = f"`y_pred` of shape (B, {c}, *spatial) (logits for activation={self.activation!r})"
        else:
            expect = f"`y_pred` of shape (B, {c}, *spatial), (B, 1, *spatial) or (B, *spatial)"
        raise ValueError(
            f"{expect} and `y` of shape (B, 1, *spatial), (B, *spatial) or (B, {c}, *spatial) with the same B and "
            f"spatial shape (num_classes={c}), got y_pred shape {tuple(y_pred.shape)} and y shape {tuple(y.shape)}."
        )

    def _update_batch(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        y_pred, y = plain_tensor(y_pred.detach()), plain_tensor(y.detach())
        pred_kind, true_kind = self._layout(y_pred, y)
        with autocast_off(y_pred.device):  # an evaluator under AMP: counts stay exact
            if self.activation == "sigmoid":
                tp, psum, tsum = self._sigmoid_counts(y_pred, y, true_kind)
            else:
                tp, psum, tsum = self._label_counts(y_pred, y, pred_kind, true_kind)
            self._accumulate(tp, psum, tsum)

    def _target_labels(self, y: torch.Tensor, kind: str) -> torch.Tensor:
        """Integer target labels (B, N); a one-hot target is reduced by argmax, its ignored voxels relabelled."""
        b = y.shape[0]
        if kind != "dense":
            check_integer_labels(y, "y")
            return y.reshape(b, -1)
        labels = _argmax_channels(y)
        ii = self.ignore_index
        if ii is not None and not 0 <= ii < self.num_classes:
            # MONAI's rule for one-hot targets: an all-zero voxel is an ignored voxel
            empty = y.reshape(b, self.num_classes, -1).amax(1) <= 0
            labels = labels.masked_fill(empty, ii)
        return labels

    def _label_counts(
        self, y_pred: torch.Tensor, y: torch.Tensor, pred_kind: str, true_kind: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = y_pred.shape[0]
        if pred_kind == "dense":
            pred_labels = _argmax_channels(y_pred)
        else:
            check_integer_labels(y_pred, "y_pred")
            pred_labels = y_pred.reshape(b, -1)
        true_labels = self._target_labels(y, true_kind)
        terms = label_terms(pred_labels, true_labels, self.num_classes, self.ignore_index, names=("y_pred", "y"))
        return tuple(terms)  # type: ignore[return-value]

    def _sigmoid_counts(
        self, y_pred: torch.Tensor, y: torch.Tensor, true_kind: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c = y_pred.shape[:2]
        n = y_pred[0, 0].numel()
        # binary 0/1 sums are exact in float32 up to 2**24 voxels per sample and class
        dtype = torch.float32 if n <= _EXACT_FLOAT32 else torch.float64
        x = y_pred.float() if y_pred.dtype in (torch.float16, torch.bfloat16) else y_pred
        pred = (torch.sigmoid(x) >= self.threshold).to(dtype)
        ii = self.ignore_index
        if true_kind == "dense" or c == 1:
            # one channel: any layout of y is the binary mask of that channel (the losses' rules for dense targets)
            target = y.reshape(b, c, -1).to(dtype)
            mask = dense_ignore_mask(target, ii)
            check_binary(target, mask, name="y", why=" per channel for activation='sigmoid'")
            terms, _ = soft_terms(pred, target=target, mask=mask)
        else:
            labels, mask = label_map(y, c, ii, name="y")
            terms, _ = soft_terms(pred, labels=labels, mask=mask)
        return tuple(t.round().to(torch.long) for t in terms)  # type: ignore[return-value]

    def _accumulate(self, tp: torch.Tensor, psum: torch.Tensor, tsum: torch.Tensor) -> None:
        dev = self._device
        tp, psum, tsum = (t.to(device=dev, dtype=torch.long) for t in (tp, psum, tsum))
        self._tp += tp.sum(0)
        self._pred_sum += psum.sum(0)
        self._true_sum += tsum.sum(0)
        denom = psum + tsum
        defined = denom > 0
        zero = torch.zeros((), dtype=self._float64, device=dev)
        dice = torch.where(defined, 2.0 * tp.to(self._float64) / denom.clamp_min(1), zero)
        self._dice_sum += dice.sum(0)
        self._dice_count += defined.sum(0)
        self._num_samples += tp.shape[0]
