"""The implementations compared (monai_gdl_plus.app.bench.registry): names and groups, what each key builds, and
why one cannot be built."""

from __future__ import annotations

import sys

import pytest

from monai_gdl_plus import DiceFocalPlusLoss, DicePlusLoss, GeneralizedDicePlusLoss, TverskyPlusLoss
from monai_gdl_plus.app.bench import registry

PAIRS = ["ours-dice", "ours-gdl", "ours-dicece", "monai-dice", "monai-gdl", "monai-dicece"]


def test_groups_resolve_in_a_fixed_order():
    assert registry.resolve_losses(None) == list(registry.LOSSES)
    assert registry.resolve_losses(["core"]) == [*PAIRS, "nnunet-memeff"]
    assert registry.resolve_losses("monai-gdl, ours-dice,ours") == [
        "ours-dice", "ours-gdl", "ours-dicece", "ours-dicefocal", "ours-tversky", "monai-gdl",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"`losses` must be one of .*'monai-dice'"):
        registry.resolve_losses(["monai-dise"])
    with pytest.raises(ValueError, match="`losses` must name at least one of"):
        registry.resolve_losses([" , "])


def test_each_key_builds_what_its_spec_says():
    """Ours as labelled (Dice+CE with lambda_ce=1, Tversky 0.3/0.7), MONAI's counterpart of the same family, all
    configured for softmax over a label map."""
    import monai.losses as ml

    expected = {
        "ours-dice": DicePlusLoss, "ours-gdl": GeneralizedDicePlusLoss, "ours-dicece": DicePlusLoss,
        "ours-dicefocal": DiceFocalPlusLoss, "ours-tversky": TverskyPlusLoss, "monai-dice": ml.DiceLoss,
        "monai-gdl": ml.GeneralizedDiceLoss, "monai-dicece": ml.DiceCELoss, "monai-dicefocal": ml.DiceFocalLoss,
        "monai-tversky": ml.TverskyLoss,
    }  # fmt: skip
    for key, cls in expected.items():
        loss = registry.build_loss(key)
        assert type(loss) is cls, key
        assert registry.SPECS[key].owner == key.split("-")[0]
    assert registry.build_loss("ours-dicece").options.lambda_ce == 1.0
    assert registry.build_loss("ours-dice").options.lambda_ce == 0.0
    assert registry.build_loss("ours-tversky").options.tversky == (0.3, 0.7)
    with pytest.raises(ValueError, match="`losses` entries must be one of"):
        registry.build_loss("ours-nope")


def test_availability_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # makes `import nnunetv2...` raise ImportError
    assert registry.availability("nnunet-memeff").startswith("not installed (")
    assert registry.availability("ours-dice") == "ok"
    assert registry.error_text(RuntimeError("boom\nsecond line")) == "error: RuntimeError: boom"

