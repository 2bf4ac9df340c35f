"""Every Dice-family loss section of MONAI's model zoo, swapped by name (``FooLoss`` -> ``monai_gdl_plus.FooPlusLoss``).

Where the table comes from: ``github.com/Project-MONAI/model-zoo`` at commit
``dfae206df112837d817e78d3727c9f32b3b52e82`` (2024-10-11, "auto update model_info [skip ci] (#699)"), read on
2026-11-28 by hand. Every ``models/*/configs/*.json|yaml`` was searched for ``(Dice|Tversky)*Loss``; the hits are 17
bundles, all in training configs (``train.json``/``train.yaml``; a bundle's other training configs --
``search.yaml`` of the two DiNTS bundles, ``train-multigpu.yaml`` of pediatric_abdominal_ct_segmentation -- carry
the same loss arguments; ``multi_gpu_train.*`` only override the network wrapper). No bundle uses
``GeneralizedDiceLoss``, ``GeneralizedDiceFocalLoss`` or ``TverskyLoss``. The keyword arguments below are the
configured ones, literally: none of them is an ``@`` reference or a ``$`` expression. The channel counts and target
kinds were resolved from the networks and transforms of the same configs (``$len(@label_names)`` = 2 for
spleen_deepedit_annotation; ``@output_classes``/``@output_channels`` for the YAML bundles); nothing of the model zoo
is copied into this repository beyond these arguments.

Target kinds, as each bundle's transforms deliver them to the loss:

- ``label``: an integer label map (B, 1, *S) of C classes (``to_onehot_y=True``);
- ``bool``: a binary multi-channel bool tensor (B, C, *S): brats (``ConvertToMultiChannelBasedOnBratsClassesd``
  yields bool) and vista3d (its trainer calls ``loss(outputs[[id]], labels == prompt_class[id])``: one channel
  per prompted class, bool);
- ``uint8``: a binary uint8 mask (B, C, *S): pathology_nuclick_annotation (``SplitLabeld`` casts to uint8).

Each bundle is checked as configured: MONAI's class and ours (renamed; ``normalize_weights=False`` would be added
for a Generalized* class), seeded float64 logits (2, C, 8, 8, 8) or (2, C, 8, 8) for the 2-D bundles, value and
gradient to 1e-5. vista3d's loss is called with one channel at a time (see above), so it needs no departure; its
configuration with several channels would hit one (``sigmoid=True``, C > 1: our CE term is per-channel BCE, MONAI's
DiceCELoss takes softmax CE there), so that variant is checked against MONAI's DiceLoss + torch's BCEWithLogits.
Run with ``-s`` for the table of deviations. The largest (~1e-8 to 1e-7 in float64) are MONAI's float32 pieces:
its FocalLoss casts the logits to float32, and its float32 one-hot target enters ``squared_pred``'s norm.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import monai.losses as ML
import pytest
import torch

import monai_gdl_plus

MODEL_ZOO_COMMIT = "dfae206df112837d817e78d3727c9f32b3b52e82"
TOL = 1e-5


class Bundle(NamedTuple):
    name: str  # bundle folder under models/
    monai_class: str  # the loss's `_target_` (all short names in the model zoo)
    kwargs: dict[str, Any]  # the loss's arguments exactly as configured
    channels: int  # output channels the loss sees
    target: str  # "label" | "bool" | "uint8" (see the module docstring)
    spatial_dims: int = 3
    configs: tuple[str, ...] = ("train.json",)  # the configs (under configs/) that define this loss section


_DINTS = {"include_background": False, "to_onehot_y": True, "softmax": True, "squared_pred": True, "batch": True,
          "smooth_nr": 1e-05, "smooth_dr": 1e-05}  # fmt: skip
_UNEST = {"to_onehot_y": True, "softmax": True, "squared_pred": True, "batch": True}

BUNDLES: list[Bundle] = [
    Bundle("brats_mri_segmentation", "DiceLoss",
           {"smooth_nr": 0, "smooth_dr": 1e-05, "squared_pred": True, "to_onehot_y": False, "sigmoid": True},
           3, "bool"),
    Bundle("endoscopic_tool_segmentation", "DiceFocalLoss",
           {"include_background": False, "to_onehot_y": True, "softmax": True, "jaccard": True},
           2, "label", spatial_dims=2),
    Bundle("multi_organ_segmentation", "DiceCELoss", dict(_DINTS), 8, "label",
           configs=("train.yaml", "search.yaml")),
    Bundle("pancreas_ct_dints_segmentation", "DiceCELoss", dict(_DINTS), 3, "label",
           configs=("train.yaml", "search.yaml")),
    Bundle("pathology_nuclick_annotation", "DiceLoss", {"sigmoid": True, "squared_pred": True},
           1, "uint8", spatial_dims=2),
    Bundle("pediatric_abdominal_ct_segmentation", "DiceCELoss",
           {"include_background": False, "to_onehot_y": True, "softmax": True, "squared_pred": True, "batch": True,
            "smooth_nr": 1e-06, "smooth_dr": 1e-06},
           4, "label", configs=("train.yaml", "train-multigpu.yaml")),
    Bundle("prostate_mri_anatomy", "DiceFocalLoss",
           {"to_onehot_y": True, "softmax": True, "include_background": False}, 3, "label"),
    Bundle("renalStructures_CECT_segmentation", "DiceLoss",
           {"include_background": False, "to_onehot_y": True, "sigmoid": True, "softmax": False,
            "squared_pred": False, "jaccard": False, "reduction": "mean", "smooth_nr": 0.0, "smooth_dr": 1e-05,
            "batch": False},
           6, "label"),
    Bundle("renalStructures_UNEST_segmentation", "DiceCELoss", dict(_UNEST), 4, "label"),
    Bundle("segmentation_template", "DiceLoss", {"include_background": True, "to_onehot_y": True, "softmax": True},
           4, "label", configs=("train.yaml",)),
    Bundle("spleen_ct_segmentation", "DiceCELoss",
           {"include_background": True, "to_onehot_y": True, "softmax": True, "squared_pred": True, "batch": True,
            "smooth_nr": 1e-05, "smooth_dr": 1e-05, "lambda_dice": 0.5, "lambda_ce": 0.5},
           2, "label"),
    Bundle("spleen_deepedit_annotation", "DiceCELoss", {"to_onehot_y": True, "softmax": True}, 2, "label"),
    Bundle("swin_unetr_btcv_segmentation", "DiceCELoss", dict(_UNEST), 14, "label"),
    Bundle("ventricular_short_axis_3label", "DiceLoss",
           {"include_background": False, "to_onehot_y": True, "softmax": True}, 4, "label", spatial_dims=2),
    Bundle("vista3d", "DiceCELoss",
           {"include_background": True, "sigmoid": True, "smooth_dr": 1e-05, "smooth_nr": 0, "squared_pred": True,
            "to_onehot_y": False},
           1, "bool"),
    Bundle("wholeBody_ct_segmentation", "DiceCELoss", {"to_onehot_y": True, "softmax": True}, 105, "label"),
    Bundle("wholeBrainSeg_Large_UNEST_segmentation", "DiceCELoss", dict(_UNEST), 133, "label"),
]  # fmt: skip

NUM_BUNDLES = 17  # bundles of the model zoo at MODEL_ZOO_COMMIT with a Dice-family loss in a training config
DICE_FAMILY = ("DiceLoss", "DiceCELoss", "DiceFocalLoss", "GeneralizedDiceLoss", "GeneralizedDiceFocalLoss",
               "TverskyLoss")  # fmt: skip

# configurations that hit a documented departure: (id, bundle, channels, why); checked against MONAI's pieces
DEPARTURES = [
    ("vista3d-3ch-sigmoid-vs-DiceLoss+BCEWithLogits", "vista3d", 3,
     "sigmoid=True with C > 1: our CE term is per-channel BCE-with-logits (MONAI's DiceCELoss: softmax CE)"),
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------------- helpers


def _ours_name(monai_class: str) -> str:
    return monai_class.replace("Loss", "PlusLoss")


def _build(bundle: Bundle):
    """MONAI's loss and ours, from the same configured arguments (ours renamed)."""
    theirs = getattr(ML, bundle.monai_class)(**bundle.kwargs)
    extra = {"normalize_weights": False} if bundle.monai_class.startswith("Generalized") else {}
    ours = getattr(monai_gdl_plus, _ours_name(bundle.monai_class))(**bundle.kwargs, **extra)
    return ours, theirs


def _inputs(bundle: Bundle, channels: int | None = None, seed: int = 0):
    """Seeded float64 logits (2, C, 8, ...) and the target the bundle's transforms deliver."""
    c = bundle.channels if channels is None else channels
    spatial = (8,) * bundle.spatial_dims
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn((2, c, *spatial), generator=g, dtype=torch.float64)
    if bundle.target == "label":
        labels = torch.randint(0, c, (2, 1, *spatial), generator=g)
        if c > 2:
            labels[-1][labels[-1] == c - 1] = 0  # the last class absent from the last sample
        return logits, labels
    mask = torch.rand((2, c, *spatial), generator=g) < 0.3
    return logits, mask if bundle.target == "bool" else mask.to(torch.uint8)


def _value_and_grad(loss, x: torch.Tensor, y: torch.Tensor):
    """Loss value and d(sum(value * cotangent))/dx with a fixed non-uniform cotangent (as in tests/test_losses.py)."""
    xi = x.detach().clone().requires_grad_(True)
    v = loss(xi, y)
    cot = torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype).reshape(v.shape) if v.numel() > 1 else torch.ones_like(v)
    (grad,) = torch.autograd.grad((v * cot).sum(), xi)
    return v.detach(), grad


def _compare(record, key: str, ours, reference, x, y) -> None:
    """Ours on the target as delivered, the reference on its float copy (a binary bool/uint8 mask); ours must also
    give the same on that float copy. MONAI 1.6.1 cannot take the bool/uint8 mask itself with ``squared_pred=True``
    (``linalg.vector_norm`` rejects integer tensors), which brats, nuclick and vista3d all configure."""
    y_ref = y if y.dtype == torch.int64 else y.to(x.dtype)
    a, ga = _value_and_grad(ours, x, y)
    b, gb = _value_and_grad(reference, x, y_ref)
    record[key] = (float((a - b).abs().max()), float((ga - gb).abs().max()))
    torch.testing.assert_close(a, b.to(a.dtype), atol=TOL, rtol=0)
    torch.testing.assert_close(ga, gb, atol=TOL, rtol=0)
    if y_ref is not y:
        a2, ga2 = _value_and_grad(ours, x, y_ref)
        torch.testing.assert_close((a2, ga2), (a, ga), atol=0, rtol=0)


@pytest.fixture(scope="module")
def deviations():
    """Max |value diff| and |grad diff| per case; printed as a markdown table at the end (visible with ``-s``)."""
    record: dict[str, tuple[float, float]] = {}
    yield record
    if record:
        by_name = {b.name: b for b in BUNDLES}
        print(f"\nModel-zoo loss sections (model-zoo {MODEL_ZOO_COMMIT[:10]}), ours vs reference:")
        print("| bundle | MONAI class | ours | key args | |Δvalue| | |Δgrad| |")
        print("|---|---|---|---|---:|---:|")
        for key, (dv, dg) in record.items():
            b = by_name.get(key)
            if b is None:  # a departure case
                _, name, c, _ = next(d for d in DEPARTURES if d[0] == key)
                b = by_name[name]
                cls, ours, note = "DiceLoss + BCEWithLogits", _ours_name(b.monai_class), f"C={c} (departure)"
            else:
                cls, ours, note = b.monai_class, _ours_name(b.monai_class), f"C={b.channels}, {b.target}"
            args = ", ".join(f"{k}={v}" for k, v in b.kwargs.items())
            print(f"| {key} | {cls} | {ours} | {args}; {note} | {dv:.1e} | {dg:.1e} |")


# ---------------------------------------------------------------------------------------------------------- tests


def test_table_covers_the_model_zoo():
    assert len(BUNDLES) == NUM_BUNDLES
    assert len({b.name for b in BUNDLES}) == NUM_BUNDLES
    for b in BUNDLES:
        assert b.monai_class in DICE_FAMILY
        assert b.target in ("label", "bool", "uint8") and b.spatial_dims in (2, 3)
        assert hasattr(ML, b.monai_class) and hasattr(monai_gdl_plus, _ours_name(b.monai_class))
        assert b.kwargs.get("to_onehot_y", False) == (b.target == "label")


@pytest.mark.parametrize("bundle", BUNDLES, ids=[f"{b.name}-{b.monai_class}" for b in BUNDLES])
def test_renamed_loss_matches_monai(bundle, deviations):
    ours, theirs = _build(bundle)
    x, y = _inputs(bundle)
    _compare(deviations, bundle.name, ours, theirs, x, y)


@pytest.mark.parametrize("case", DEPARTURES, ids=[d[0] for d in DEPARTURES])
def test_departure_matches_monai_pieces(case, deviations):
    """The documented departure, checked against MONAI's DiceLoss plus torch's BCE-with-logits (mean over voxels x
    channels), with the bundle's Dice arguments and DiceCELoss's default lambdas (1, 1)."""
    key, name, channels, _why = case
    bundle = next(b for b in BUNDLES if b.name == name)
    assert bundle.monai_class == "DiceCELoss" and bundle.kwargs.get("sigmoid") and channels > 1
    ours, _ = _build(bundle)
    lambda_dice = bundle.kwargs.get("lambda_dice", 1.0)
    lambda_ce = bundle.kwargs.get("lambda_ce", 1.0)
    dice_kwargs = {k: v for k, v in bundle.kwargs.items() if k not in ("lambda_dice", "lambda_ce", "weight")}
    dice = ML.DiceLoss(**dice_kwargs)
    bce = torch.nn.BCEWithLogitsLoss(reduction="mean")

    def reference(x, y):
        return lambda_dice * dice(x, y) + lambda_ce * bce(x, y.to(x.dtype))

    x, y = _inputs(bundle, channels=channels)
    _compare(deviations, key, ours, reference, x, y)
    # and MONAI's own DiceCELoss really differs there (softmax CE): the departure is not vacuous
    theirs = ML.DiceCELoss(**bundle.kwargs)
    yf = y.to(x.dtype)
    assert float((theirs(x, yf) - reference(x, yf)).abs()) > 1e-3


def test_short_name_resolves_through_bundle_config_parser():
    """spleen_ct_segmentation's loss section with only ``_target_`` renamed, after ``$import monai_gdl_plus``."""
    ConfigParser = pytest.importorskip("monai.bundle").ConfigParser
    spleen = next(b for b in BUNDLES if b.name == "spleen_ct_segmentation")
    config = {"imports": ["$import monai_gdl_plus"], "loss": {"_target_": spleen.monai_class, **spleen.kwargs}}
    theirs = ConfigParser(config).get_parsed_content("loss")
    assert type(theirs) is ML.DiceCELoss
    config["loss"]["_target_"] = _ours_name(spleen.monai_class)
    ours = ConfigParser(config).get_parsed_content("loss")
    assert type(ours) is monai_gdl_plus.DiceCEPlusLoss
    assert (ours.lambda_dice, ours.lambda_ce, ours.squared_pred, ours.batch) == (0.5, 0.5, True, True)
    x, y = _inputs(spleen)
    a, ga = _value_and_grad(ours, x, y)
    b, gb = _value_and_grad(theirs, x, y)
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    torch.testing.assert_close(ga, gb, atol=TOL, rtol=0)
