"""Tests of monai_gdl_plus.metrics.PerClassDice against torchmetrics (global) and MONAI (per image)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cases import forbid_host_syncs
from hypothesis import given, settings
from hypothesis import strategies as st
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from monai.data import MetaTensor
from monai.handlers import from_engine
from monai.metrics import DiceMetric
from torchmetrics.segmentation import DiceScore

import monai_gdl_plus.metrics as metrics_module
from monai_gdl_plus import PerClassDice, _ops

NAN = float("nan")


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------


def make_batches(num_batches, batch, num_classes, spatial, seed=0, absent=(), fp_only=()):
    """Logits (B, C, *S) and label maps (B, 1, *S) from random blobs.

    ``absent`` classes are neither predicted nor in the target; ``fp_only`` classes are predicted on some voxels
    but never in the target, so their Dice is defined (0) without ground truth.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        labels = torch.randint(0, num_classes, (batch, 1, *spatial), generator=g)
        for c in (*absent, *fp_only):
            labels[labels == c] = 0
        logits = torch.randn(batch, num_classes, *spatial, generator=g)
        # make the prediction agree with the label on ~60% of voxels
        agree = torch.rand(batch, 1, *spatial, generator=g) < 0.6
        logits = logits + 4.0 * agree * F.one_hot(labels[:, 0], num_classes).movedim(-1, 1)
        for c in absent:
            logits[:, c] = -100.0
        out.append((logits, labels))
    return out


def keys(metric: PerClassDice) -> list[str]:
    return [f"{metric.prefix}/{metric.class_names[c]}" for c in metric.reported]


def as_tensor(result: dict[str, float], names: list[str]) -> torch.Tensor:
    return torch.tensor([result[k] for k in names], dtype=torch.float64)


def nanmean(values: torch.Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else NAN


def same(a: float, b: float, tol: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def run_metric(metric: PerClassDice, batches) -> dict[str, float]:
    metric.reset()
    for b in batches:
        metric.update(b)
    return metric.compute()


# --------------------------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("spatial", [(9, 7), (6, 5, 4)])
def test_global_equals_torchmetrics(include_background, spatial):
    num_classes = 5
    batches = make_batches(4, 2, num_classes, spatial, seed=1, absent=(3,), fp_only=(4,))
    metric = PerClassDice(num_classes, include_background=include_background, aggregation="global")
    result = run_metric(metric, batches)

    ref = DiceScore(
        num_classes=num_classes, include_background=include_background, average="none",
        aggregation_level="global", input_format="index",
    )  # fmt: skip
    for logits, labels in batches:
        ref.update(logits.argmax(1), labels[:, 0])
    expected = ref.compute().to(torch.float64)  # torchmetrics: NaN where P + G == 0, as ours

    got = as_tensor(result, keys(metric))
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=1e-6)
    # the absent class is NaN, the false-positive-only class is 0 (not NaN, not 1)
    absent_key, fp_key = f"dice/{3}", f"dice/{4}"
    assert math.isnan(result[absent_key]) and result[fp_key] == 0.0
    assert same(result["dice/mean"], nanmean(expected), tol=1e-6)


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("spatial", [(9, 7), (6, 5, 4)])
def test_per_image_equals_monai_dice_metric(include_background, spatial):
    """MONAI's ignore_empty=True gives NaN whenever the image lacks the class in its target; ours is NaN only when
    the class is in neither prediction nor target (a false positive scores 0). The reference fills that case in."""
    num_classes = 4
    batches = make_batches(3, 3, num_classes, spatial, seed=2, fp_only=(3,))
    # one image with class 2 absent from both, one with class 1 predicted but absent from the target
    batches[0][1][0][batches[0][1][0] == 2] = 0
    batches[0][0][0, 2] = -100.0
    metric = PerClassDice(num_classes, include_background=include_background, aggregation="per_image")
    result = run_metric(metric, batches)

    monai_metric = DiceMetric(include_background=include_background, reduction="none", ignore_empty=True)
    per_image = []
    for logits, labels in batches:
        pred = F.one_hot(logits.argmax(1), num_classes).movedim(-1, 1)
        target = F.one_hot(labels[:, 0], num_classes).movedim(-1, 1)
        values = monai_metric(pred, target).to(torch.float64)  # (B, C')
        kept = slice(0 if include_background else 1, None)
        reduce = tuple(range(2, pred.ndim))
        gt_empty = target.sum(reduce)[:, kept] == 0
        pred_present = pred.sum(reduce)[:, kept] > 0
        ours = torch.where(gt_empty & pred_present, torch.zeros_like(values), values)
        per_image.append(ours)
    per_image = torch.cat(per_image)
    expected = torch.stack([torch.tensor(nanmean(per_image[:, j])) for j in range(per_image.shape[1])]).double()

    got = as_tensor(result, keys(metric))
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=1e-6)
    assert result["dice/3"] == 0.0  # never in the targets, predicted in some images: defined, 0
    assert same(result["dice/mean"], nanmean(expected), tol=1e-6)


@pytest.mark.parametrize("aggregation", ["global", "per_image"])
def test_accumulation_equals_one_big_batch(aggregation):
    batches = make_batches(3, 2, 3, (5, 4, 3), seed=3)
    metric = PerClassDice(3, include_background=True, aggregation=aggregation)
    result = run_metric(metric, batches)
    big = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    assert run_metric(metric, [big]) == pytest.approx(result, abs=1e-12, nan_ok=True)


@pytest.mark.parametrize("ignore_index", [255, -1, 2])
def test_ignore_index_equals_dropping_the_voxels(ignore_index):
    num_classes = 4
    batches = make_batches(3, 2, num_classes, (6, 5, 4), seed=4)
    g = torch.Generator().manual_seed(5)
    for _, labels in batches:
        labels[torch.rand(labels.shape, generator=g) < 0.3] = ignore_index
    metric = PerClassDice(num_classes, include_background=True, ignore_index=ignore_index)
    result = run_metric(metric, batches)

    ref = DiceScore(num_classes=num_classes, include_background=True, average="none", aggregation_level="global",
                    input_format="index")  # fmt: skip
    for logits, labels in batches:
        keep = labels[:, 0] != ignore_index
        ref.update(logits.argmax(1)[keep][None], labels[:, 0][keep][None])
    expected = ref.compute().double()
    reported = [c for c in range(num_classes) if c != ignore_index]
    assert list(result)[:-1] == [f"dice/{c}" for c in reported]  # an in-range ignore_index is not reported
    torch.testing.assert_close(as_tensor(result, keys(metric)), expected[reported], equal_nan=True, rtol=0, atol=1e-6)


def test_nan_semantics():
    """A class absent from prediction and target is NaN (not 0, not 1); the mean skips it; all-NaN mean is NaN."""
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    labels[:, :, :2] = 1
    logits = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float() * 5
    metric = PerClassDice(3)
    metric.update((logits, labels))
    result = metric.compute()
    assert result["dice/1"] == 1.0
    assert math.isnan(result["dice/2"])
    assert result["dice/mean"] == 1.0

    empty = PerClassDice(2, aggregation="per_image")
    empty.update((torch.zeros(1, 2, 3, 3).index_fill_(1, torch.tensor([0]), 1.0), torch.zeros(1, 1, 3, 3)))
    out = empty.compute()
    assert math.isnan(out["dice/1"]) and math.isnan(out["dice/mean"])


@settings(max_examples=25, deadline=None)
@given(
    num_classes=st.integers(2, 5),
    batch=st.integers(1, 3),
    size=st.integers(1, 6),
    include_background=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_global_matches_python_counts(num_classes, batch, size, include_background, seed):
    """Property: values in [0, 1] or NaN, equal to 2TP/(P+G) counted voxel by voxel in Python."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, num_classes, (batch, size, 3), generator=g)
    true = torch.randint(0, num_classes, (batch, 1, size, 3), generator=g)
    metric = PerClassDice(num_classes, include_background=include_background, activation=None)
    metric.update((pred, true))
    result = metric.compute()
    p, t = pred.flatten().tolist(), true.flatten().tolist()
    for c in metric.reported:
        tp = sum(1 for a, b in zip(p, t, strict=False) if a == c and b == c)
        denom = p.count(c) + t.count(c)
        expected = 2 * tp / denom if denom else NAN
        got = result[f"dice/{c}"]
        assert same(got, expected)
        assert math.isnan(got) or 0.0 <= got <= 1.0


# --------------------------------------------------------------------------------------------------------------------
# input layouts
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["global", "per_image"])
def test_input_layouts_agree(aggregation):
    num_classes = 4
    batches = make_batches(2, 2, num_classes, (5, 4, 3), seed=6)
    kw = {"num_classes": num_classes, "aggregation": aggregation}
    expected = run_metric(PerClassDice(**kw), batches)

    def onehot(labels):
        return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()

    variants = {
        "label map without channel": (PerClassDice(**kw), [(x, y[:, 0]) for x, y in batches]),
        "float label map": (PerClassDice(**kw), [(x, y.float()) for x, y in batches]),
        "one-hot target": (PerClassDice(**kw), [(x, onehot(y)) for x, y in batches]),
        "probabilities": (PerClassDice(**kw), [(x.softmax(1), y) for x, y in batches]),
        "MetaTensor": (PerClassDice(**kw), [(MetaTensor(x), MetaTensor(y.float())) for x, y in batches]),
        "one-hot prediction, activation None": (
            PerClassDice(**kw, activation=None), [(onehot(x.argmax(1, keepdim=True)), onehot(y)) for x, y in batches]
        ),
        "label-map prediction, activation None": (
            PerClassDice(**kw, activation=None), [(x.argmax(1, keepdim=True).float(), y) for x, y in batches]
        ),
        "decollated lists": (
            PerClassDice(**kw), [([MetaTensor(s) for s in x], [MetaTensor(s.float()) for s in y]) for x, y in batches]
        ),
    }
    for name, (metric, data) in variants.items():
        got = run_metric(metric, data)
        assert got == pytest.approx(expected, abs=1e-12, nan_ok=True), name


def test_decollated_output_through_an_engine():
    """What a MONAI SupervisedEvaluator hands over: a list of per-sample dicts, read with from_engine."""
    batches = make_batches(3, 2, 3, (6, 5, 4), seed=7)
    expected = run_metric(PerClassDice(3, aggregation="per_image"), batches)

    def step(engine, batch):
        x, y = batch
        return [{"pred": MetaTensor(p), "label": MetaTensor(t.float())} for p, t in zip(x, y, strict=False)]

    engine = Engine(step)
    PerClassDice(3, aggregation="per_image", output_transform=from_engine(["pred", "label"])).attach(engine, "pcd")
    engine.run(batches)
    got = {k: v for k, v in engine.state.metrics.items()}
    assert "pcd" not in got  # flattened: scalars only, no nested dict under the attach name
    assert got == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_argmax_tie_breaking_and_chunks(monkeypatch):
    """The fast argmax keeps torch.argmax's first-maximum rule, across CPU chunk boundaries."""
    monkeypatch.setattr(metrics_module, "_CPU_CHUNK", 7)
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 3, (2, 5, 6, 5), generator=g).float()  # many ties
    got = metrics_module._argmax_channels(x)
    assert torch.equal(got, x.argmax(1).reshape(2, -1))
    assert torch.equal(metrics_module._argmax_channels(x > 0), (x > 0).to(torch.uint8).argmax(1).reshape(2, -1))


# --------------------------------------------------------------------------------------------------------------------
# sigmoid (multi-label)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_background", [False, True])
def test_sigmoid_multilabel_equals_torchmetrics(include_background):
    num_classes, threshold = 3, 0.4
    g = torch.Generator().manual_seed(9)
    batches = []
    for _ in range(3):
        logits = torch.randn(2, num_classes, 6, 5, 4, generator=g)
        target = (torch.rand(2, num_classes, 6, 5, 4, generator=g) < 0.3).float()  # overlapping channels
        batches.append((logits, target))
    metric = PerClassDice(num_classes, include_background=include_background, activation="sigmoid",
                          threshold=threshold)  # fmt: skip
    result = run_metric(metric, batches)
    ref = DiceScore(num_classes=num_classes, include_background=include_background, average="none",
                    aggregation_level="global", input_format="one-hot")  # fmt: skip
    for logits, target in batches:
        ref.update((torch.sigmoid(logits) >= threshold).long(), target.long())
    torch.testing.assert_close(
        as_tensor(result, keys(metric)), ref.compute().double(), equal_nan=True, rtol=0, atol=1e-6
    )


def test_sigmoid_label_map_target_and_single_channel():
    num_classes = 3
    batches = make_batches(2, 2, num_classes, (5, 4, 3), seed=10)
    onehot = [(x, F.one_hot(y[:, 0], num_classes).movedim(-1, 1).float()) for x, y in batches]
    m = PerClassDice(num_classes, activation="sigmoid", ignore_index=None)
    assert run_metric(m, batches) == pytest.approx(run_metric(m, onehot), abs=1e-12, nan_ok=True)

    # binary segmentation with one channel: the only class must be reported explicitly
    x = torch.randn(2, 1, 5, 4)
    y = (torch.rand(2, 1, 5, 4) < 0.5).long()
    single = PerClassDice(1, include_background=True, activation="sigmoid", class_names=["organ"])
    out = run_metric(single, [(x, y)])
    pred = x >= 0.0
    tp = (pred & (y > 0)).sum().item()
    assert out["dice/organ"] == pytest.approx(2 * tp / (pred.sum().item() + y.sum().item()))
    assert run_metric(single, [(x, y[:, 0])]) == out  # (B, *S) mask, same meaning


def test_sigmoid_ignore_index_label_map():
    x = torch.randn(2, 3, 6, 5)
    y = torch.randint(0, 3, (2, 1, 6, 5))
    y_ignored = y.clone()
    y_ignored[:, :, :2] = 255
    metric = PerClassDice(3, activation="sigmoid", ignore_index=255, include_background=True)
    got = run_metric(metric, [(x, y_ignored)])
    expected = run_metric(
        PerClassDice(3, activation="sigmoid", include_background=True), [(x[:, :, 2:], y[:, :, 2:])]
    )
    assert got == pytest.approx(expected, abs=1e-12, nan_ok=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "kwargs", [dict(activation="softmax"), dict(activation="sigmoid", ignore_index=255),
               dict(activation="sigmoid", aggregation="per_image")],
    ids=["softmax", "sigmoid ignore_index", "sigmoid per_image"],
)  # fmt: skip
def test_update_under_autocast_counts_exactly(kwargs, dtype):
    """An evaluator under AMP: half logits inside ``torch.autocast`` give the same per-class Dice as float32 on the
    same numbers, with per-class counts far past float16's exact integers (2048) and largest value (65504)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 48, 48, 48, generator=g).to(dtype)
    y = torch.randint(0, 3, (2, 1, 48, 48, 48), generator=g)
    y[:, :, :4] = 255
    y = y if "ignore_index" in kwargs else y.clamp_max(2)
    expected = run_metric(PerClassDice(3, include_background=True, **kwargs), [(x.float(), y)])
    with torch.autocast("cpu", dtype=dtype):
        got = run_metric(PerClassDice(3, include_background=True, **kwargs), [(x, y)])
    assert got == expected


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_update_counts_with_autocast_off(monkeypatch, activation):
    """Inside an evaluator's ``torch.autocast`` the counting code runs with autocast off (float16 counts are exact
    only up to 2048). White-box: nothing it calls today is autocast-eligible, so no count shows the difference."""
    seen = []
    for name in ("label_terms", "soft_terms"):
        real = getattr(metrics_module, name)

        def spy(*args, real=real, **kwargs):
            seen.append(torch.is_autocast_enabled("cpu"))
            return real(*args, **kwargs)

        monkeypatch.setattr(metrics_module, name, spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        PerClassDice(3, activation=activation).update(make_batches(1, 2, 3, (4, 4))[0])
    assert seen == [False]


# --------------------------------------------------------------------------------------------------------------------
# life cycle, names, state
# --------------------------------------------------------------------------------------------------------------------


def test_not_computable_before_update_and_after_reset():
    metric = PerClassDice(3)
    with pytest.raises(NotComputableError, match="at least one example"):
        metric.compute()
    metric.update(make_batches(1, 1, 3, (4, 4))[0])
    metric.compute()
    metric.reset()
    with pytest.raises(NotComputableError, match="at least one example"):
        metric.compute()


def test_names_prefix_and_constant_state():
    metric = PerClassDice(3, class_names=["bg", "liver", "tumour"], prefix="val_dice", aggregation="per_image")
    for b in make_batches(5, 2, 3, (4, 4, 4), seed=11):
        metric.update(b)
    assert list(metric.compute()) == ["val_dice/liver", "val_dice/tumour", "val_dice/mean"]
    for name in metric._state_dict_all_req_keys:
        state = getattr(metric, name)
        assert state.shape in {(3,), ()}, name
    assert "class_names=['bg', 'liver', 'tumour']" in repr(metric)


def test_state_dict_round_trip():
    batches = make_batches(2, 2, 3, (4, 4, 4), seed=12)
    metric = PerClassDice(3)
    for b in batches:
        metric.update(b)
    restored = PerClassDice(3)
    restored.load_state_dict(metric.state_dict())
    assert restored.compute() == pytest.approx(metric.compute(), nan_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_classes": 1}, ValueError, r"`num_classes` must be at least 2 .* got 1"),
        ({"num_classes": True}, TypeError, r"`num_classes` must be an int, got True"),
        ({"num_classes": "3"}, TypeError, r"`num_classes` must be an int, got '3'"),
        ({"num_classes": 3, "class_names": ["a", "b"]}, ValueError, r"`class_names` must have one name per class 0..2"),
        ({"num_classes": 3, "class_names": "abc"}, TypeError, r"`class_names` must be a sequence of strings"),
        ({"num_classes": 3, "class_names": ["a", "b", "a"]}, ValueError, r"must be unique, got duplicates \['a'\]"),
        ({"num_classes": 3, "class_names": ["a", 1, "c"]}, TypeError, r"`class_names` must hold non-empty strings"),
        ({"num_classes": 3, "class_names": ["bg", "mean", "c"]}, ValueError, r"must not contain 'mean'"),
        ({"num_classes": 3, "activation": "softmx"}, ValueError, r"`activation` must be one of .*softmax"),
        ({"num_classes": 3, "aggregation": "per-image"}, ValueError, r"`aggregation` must be one of .*per_image"),
        ({"num_classes": 3, "threshold": 1.5}, ValueError, r"`threshold` must be a number in \[0, 1\], got 1.5"),
        ({"num_classes": 3, "prefix": ""}, ValueError, r"`prefix` must be a non-empty string"),
        ({"num_classes": 3, "ignore_index": 1.0}, TypeError, r"`ignore_index` must be an int or None, got 1.0"),
        ({"num_classes": 1, "activation": "sigmoid"}, ValueError, r"no class left to report.*include_background=True"),
        ({"num_classes": 2, "ignore_index": 1}, ValueError, r"no class left to report"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PerClassDice(**kwargs)


def test_did_you_mean():
    with pytest.raises(ValueError, match=r"did you mean 'sigmoid'"):
        PerClassDice(3, activation="sigmoidd")


@pytest.mark.parametrize(
    "y_pred, y, kwargs, error, match",
    [
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 5), {}, ValueError,
         r"got y_pred shape \(2, 3, 4, 4\) and y shape \(2, 1, 4, 5\)"),
        (torch.zeros(2, 4, 4, 4), torch.zeros(2, 1, 4, 4), {}, ValueError, r"`y_pred` of shape \(B, 3, \*spatial\)"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(3, 1, 4, 4), {}, ValueError, r"same B and spatial shape"),
        (torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 1], [3, 7]]]]), {}, ValueError,
         r"`y` label values must lie in \[0, 3\), got \[3, 7\]"),
        (torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 1], [3, 255]]]]), {"ignore_index": 255}, ValueError,
         r"`y` label values must lie in \[0, 3\) or equal `ignore_index`=255, got \[3\]"),
        (torch.tensor([[[0, 5]]]), torch.tensor([[[0, 1]]]), {"activation": None}, ValueError,
         r"`y_pred` label values must lie in \[0, 3\), got \[5\]"),
        (torch.zeros(1, 3, 2, 2), torch.full((1, 1, 2, 2), 0.5), {}, ValueError,
         r"`y` label map must hold integer class indices"),
        (torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5), {"activation": "sigmoid"}, ValueError,
         r"`y` must be binary \(0/1\) per channel"),
        (torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 1], [4, 1]]]]), {"activation": "sigmoid"}, ValueError,
         r"`y` label values must lie in \[0, 3\), got \[4\]"),
        ([torch.zeros(3, 2, 2)] * 2, [torch.zeros(1, 2, 2)], {}, ValueError,
         r"both be lists of per-sample tensors of the same length"),
        (torch.zeros(1, 3, 2, 2), [torch.zeros(1, 2, 2)], {}, ValueError, r"both be tensors or both be lists"),
        ("logits", torch.zeros(1, 1, 2, 2), {}, TypeError, r"`y_pred` must be a torch.Tensor"),
    ],
)  # fmt: skip
def test_update_errors(y_pred, y, kwargs, error, match):
    metric = PerClassDice(3, **kwargs)
    with pytest.raises(error, match=match):
        metric.update((y_pred, y))


def test_update_needs_a_pair():
    with pytest.raises(TypeError, match=r"`output` must be a pair \(y_pred, y\)"):
        PerClassDice(3).update(torch.zeros(1, 3, 2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kwargs", [{}, {"aggregation": "per_image"}, {"activation": "sigmoid"}, {"ignore_index": 255}])
def test_cuda_update_has_no_host_sync_and_matches_cpu(kwargs):
    dev = torch.device("cuda")
    logits, labels = make_batches(1, 2, 4, (12, 10, 8), seed=13)[0]
    metric = PerClassDice(4, device=dev, **kwargs)
    x, y = logits.to(dev), labels.to(dev)
    metric.update((x, y))  # first call: lazy CUDA initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update((x, y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = PerClassDice(4, **kwargs)
    for _ in range(2):
        cpu.update((logits, labels))
    assert metric.compute() == pytest.approx(cpu.compute(), abs=1e-12, nan_ok=True)


@pytest.mark.parametrize("kwargs", [{}, {"aggregation": "per_image"}, {"activation": "sigmoid"}, {"ignore_index": 255}])
def test_accelerator_mode_update_has_no_host_sync_and_matches_host_mode(monkeypatch, kwargs):
    """The CPU counterpart of the CUDA test: with ``_ops.HOST_DEVICES`` empty, CPU tensors take the accelerator
    code paths (scatter instead of bincount, asynchronous label checks); an update then reads nothing back on the
    host, and the values equal those of host mode."""
    batches = make_batches(2, 2, 4, (12, 10, 8), seed=13)
    if "ignore_index" in kwargs:
        batches[0][1][0, 0, :3] = 255
    host = PerClassDice(4, **kwargs)
    for b in batches:
        host.update(b)
    expected = host.compute()
    accelerated = PerClassDice(4, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(_ops, "HOST_DEVICES", set())
        forbid_host_syncs(m)
        for b in batches:
            accelerated.update(b)
    assert accelerated.compute() == pytest.approx(expected, abs=1e-12, nan_ok=True)


@pytest.mark.parametrize(
    "kwargs, y_pred, y, match",
    [
        ({}, torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 1], [3, 7]]]]), r"`y` label values must lie in \[0, 3\)\."),
        ({"ignore_index": 255}, torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 255], [3, 1]]]]),
         r"`y` label values must lie in \[0, 3\) or equal `ignore_index`=255\."),
        ({"activation": None}, torch.tensor([[[0, 5]]]), torch.tensor([[[0, 1]]]),
         r"`y_pred` label values must lie in \[0, 3\)\."),
        ({"activation": "sigmoid"}, torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 1], [4, 1]]]]),
         r"`y` label values must lie in \[0, 3\)\."),
        # a non-binary one-hot target: on a GPU the check used to be skipped (it ran on CPU tensors only)
        ({"activation": "sigmoid"}, torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5),
         r"`y` must be binary \(0/1\) per channel"),
    ],
)  # fmt: skip
def test_accelerator_mode_bad_label_raises_from_the_device_check(monkeypatch, kwargs, y_pred, y, match):
    """Accelerator mode: a label out of range is caught by the asynchronous device assertion (on CPU it raises
    at once, a RuntimeError with the message) before it can index out of bounds; nothing is accumulated."""
    monkeypatch.setattr(_ops, "HOST_DEVICES", set())
    metric = PerClassDice(3, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        metric.update((y_pred, y))
    assert int(metric._num_samples) == 0


def test_sigmoid_one_channel_ignore_index_label_map():
    """Ignored voxels may hold the ignore value in a one-channel binary target (checked after masking)."""
    metric = PerClassDice(num_classes=1, include_background=True, activation="sigmoid", ignore_index=255)
    y_pred = torch.tensor([10.0, -10.0, 10.0, -10.0]).reshape(1, 1, 4)
    y = torch.tensor([1, 0, 255, 255]).reshape(1, 1, 4)
    metric.update((y_pred, y))
    assert metric.compute()["dice/0"] == pytest.approx(1.0)
