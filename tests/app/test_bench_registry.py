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
        "ours-dice", "ours-gdl", "ours-dicece", "ours-dicefocal", "ours-tversky", "ours-masked-dice",
        "ours-wasserstein", "monai-gdl",
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




def test_masked_and_wasserstein_keys_build_their_counterparts_and_agree_with_monai():
    """``ours-masked-dice`` / ``monai-masked-dice`` and ``ours-wasserstein`` / ``monai-wasserstein``: ours and MONAI's
    class on the same region mask or distance matrix, so that their rows compare like with like (MONAI 1.6's values:
    earlier MaskedDiceLoss releases mask the logits before the softmax, and GeneralizedWassersteinDiceLoss mixes the
    samples of a batch)."""
    import monai
    import monai.losses as ml
    import torch

    from monai_gdl_plus import MaskedDicePlusLoss

    assert type(registry.build_loss("ours-masked-dice").loss) is MaskedDicePlusLoss
    assert type(registry.build_loss("monai-masked-dice").loss) is ml.MaskedDiceLoss
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 6, 6, 8, generator=g), torch.randint(0, 4, (2, 1, 6, 6, 8), generator=g)
    for family in ("wasserstein", "masked-dice"):
        assert registry.SPECS[f"ours-{family}"].family == registry.SPECS[f"monai-{family}"].family == family
        ours, theirs = registry.build_loss(f"ours-{family}")(x, y), registry.build_loss(f"monai-{family}")(x, y)
        assert 0.0 < float(ours) < 1.0
        if tuple(int(v) for v in monai.__version__.split(".")[:2]) >= (1, 6):
            torch.testing.assert_close(ours, theirs)
