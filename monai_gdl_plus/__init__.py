"""monai_gdl_plus: Dice-family losses and per-class Dice monitoring for MONAI and PyTorch-Ignite."""

from __future__ import annotations

from monai_gdl_plus import functional
from monai_gdl_plus.handlers import PerClassDiceLogger
from monai_gdl_plus.losses import (
    DiceCEPlusLoss,
    DiceFocalPlusLoss,
    DicePlusLoss,
    GeneralizedDiceFocalPlusLoss,
    GeneralizedDicePlusLoss,
    GeneralizedWassersteinDicePlusLoss,
    MaskedDicePlusLoss,
    TverskyPlusLoss,
)
from monai_gdl_plus.metrics import PerClassDice

__version__ = "0.1.0"

__all__ = [
    "DiceCEPlusLoss",
    "DiceFocalPlusLoss",
    "DicePlusLoss",
    "GeneralizedDiceFocalPlusLoss",
    "GeneralizedDicePlusLoss",
    "GeneralizedWassersteinDicePlusLoss",
    "MaskedDicePlusLoss",
    "PerClassDice",
    "PerClassDiceLogger",
    "TverskyPlusLoss",
    "functional",
    "__version__",
]
