"""The implementations compared: our losses, MONAI's and nnU-Net's, each configured for softmax over logits with an
integer label-map target, under one key (:data:`LOSSES`) and a few groups of keys (:data:`LOSS_GROUPS`).

Examples:
    >>> resolve_losses(["core"])[:3]
    ['ours-dice', 'ours-gdl', 'ours-dicece']
    >>> SPECS["monai-gdl"].family, SPECS["nnunet-memeff"].owner
    ('gdl', 'nnunet')
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from monai_gdl_plus.options import check_option

__all__ = [
    "LOSSES", "LOSS_GROUPS", "SPECS", "LossSpec", "Unavailable", "availability", "build_loss", "error_text",
    "make_loss", "resolve_losses",
]  # fmt: skip

LOSSES = (
    "ours-dice", "ours-gdl", "ours-dicece", "ours-dicefocal", "ours-tversky", "ours-masked-dice", "ours-wasserstein",
    "monai-dice", "monai-gdl", "monai-dicece", "monai-dicefocal", "monai-tversky", "monai-masked-dice",
    "monai-wasserstein",
    "nnunet-memeff",
)  # fmt: skip
LOSS_GROUPS = {
    "all": LOSSES,
    "ours": tuple(k for k in LOSSES if k.startswith("ours-")),
    "monai": tuple(k for k in LOSSES if k.startswith("monai-")),
    "nnunet": ("nnunet-memeff",),
    "core": ("ours-dice", "ours-gdl", "ours-dicece", "monai-dice", "monai-gdl", "monai-dicece", "nnunet-memeff"),
}


@dataclass(frozen=True)
class LossSpec:
    """What the table says of one implementation."""

    key: str
    label: str
    family: str  # "dice" | "gdl" | "dicece" | "dicefocal" | "tversky" | "masked-dice" | "wasserstein"
    owner: str  # "ours" | "monai" | "nnunet"


SPECS = {
    s.key: s
    for s in (
        LossSpec("ours-dice", "DicePlusLoss", "dice", "ours"),
        LossSpec("ours-gdl", "GeneralizedDicePlusLoss", "gdl", "ours"),
        LossSpec("ours-dicece", "DicePlusLoss(lambda_ce=1)", "dicece", "ours"),
        LossSpec("ours-dicefocal", "DiceFocalPlusLoss", "dicefocal", "ours"),
        LossSpec("ours-tversky", "TverskyPlusLoss(0.3, 0.7)", "tversky", "ours"),
        LossSpec("ours-masked-dice", "MaskedDicePlusLoss (no bg, 3/4 masked in)", "masked-dice", "ours"),
        LossSpec("ours-wasserstein", "GeneralizedWassersteinDicePlusLoss", "wasserstein", "ours"),
        LossSpec("monai-dice", "MONAI DiceLoss", "dice", "monai"),
        LossSpec("monai-gdl", "MONAI GeneralizedDiceLoss", "gdl", "monai"),
        LossSpec("monai-dicece", "MONAI DiceCELoss", "dicece", "monai"),
        LossSpec("monai-dicefocal", "MONAI DiceFocalLoss", "dicefocal", "monai"),
        LossSpec("monai-tversky", "MONAI TverskyLoss(0.3, 0.7)", "tversky", "monai"),
        LossSpec("monai-masked-dice", "MONAI MaskedDiceLoss (no bg, 3/4 masked in)", "masked-dice", "monai"),
        LossSpec("monai-wasserstein", "MONAI GeneralizedWassersteinDiceLoss", "wasserstein", "monai"),
        LossSpec("nnunet-memeff", "nnU-Net MemoryEfficientSoftDiceLoss", "dice", "nnunet"),
    )
}


class Unavailable(Exception):
    """The implementation cannot be imported here (e.g. nnU-Net not installed)."""


def _softmax_dim1(x: torch.Tensor) -> torch.Tensor:
    # nnU-Net's softmax_helper_dim1, written here so its import (and its dependencies) are not needed.
    return torch.softmax(x, 1)


class _RegionMasked(torch.nn.Module):
    """A masked Dice loss (background left out: ours and MONAI's then agree on a label map) called with a region
    mask (B, 1, *S) of float 0/1 that leaves out the first quarter of the last axis, built per call (the same 1/C of
    the logits' bytes for ours and MONAI's)."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(y.shape, dtype=x.dtype, device=x.device)
        mask[..., : y.shape[-1] // 4] = 0.0
        return self.loss(x, y, mask)


def _tree_distances(c: int, device: torch.device) -> torch.Tensor:
    """A hierarchical C x C class distance (BraTS-style): 0 on the diagonal, 1 to and from the background (class 0),
    0.5 between two foreground classes."""
    m = torch.full((c, c), 0.5, device=device)
    m[0, :] = 1.0
    m[:, 0] = 1.0
    return m.fill_diagonal_(0.0)


class _Wasserstein(torch.nn.Module):
    """A generalised Wasserstein Dice loss over :func:`_tree_distances` for the logits' channel count (the loss is
    built per call: its matrix depends on C; a few hundred bytes)."""

    def __init__(self, owner: str) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = _tree_distances(x.shape[1], x.device)
        if self.owner == "ours":
            from monai_gdl_plus import functional

            return functional.generalized_wasserstein_dice_plus_loss(x, y, m)
        from monai.losses import GeneralizedWassersteinDiceLoss

        return GeneralizedWassersteinDiceLoss(m)(x, y)


def make_loss(key: str, compiled: bool = False) -> torch.nn.Module:
    """One implementation, ``torch.compile``d (default inductor backend) with ``compiled``; ours with
    ``fullgraph=True``, the peers as they compile."""
    fn = build_loss(key)
    return torch.compile(fn, fullgraph=SPECS[key].owner == "ours") if compiled else fn  # type: ignore[return-value]


def build_loss(key: str) -> torch.nn.Module:
    """Build one implementation, configured for softmax over logits with an integer label-map target.

    Raises:
        Unavailable: the implementation's package cannot be imported.
    """
    if key == "ours-dice":
        from monai_gdl_plus import DicePlusLoss

        return DicePlusLoss(to_onehot_y=True, softmax=True)
    if key == "ours-gdl":
        from monai_gdl_plus import GeneralizedDicePlusLoss

        return GeneralizedDicePlusLoss(to_onehot_y=True, softmax=True)
    if key == "ours-dicece":
        from monai_gdl_plus import DicePlusLoss

        return DicePlusLoss(to_onehot_y=True, softmax=True, lambda_ce=1.0)
    if key == "ours-dicefocal":
        from monai_gdl_plus import DiceFocalPlusLoss

        return DiceFocalPlusLoss(to_onehot_y=True, softmax=True)
    if key == "ours-tversky":
        from monai_gdl_plus import TverskyPlusLoss

        return TverskyPlusLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)
    if key == "ours-masked-dice":
        from monai_gdl_plus import MaskedDicePlusLoss

        return _RegionMasked(MaskedDicePlusLoss(to_onehot_y=True, softmax=True, include_background=False))
    if key == "monai-masked-dice":
        from monai.losses import MaskedDiceLoss

        return _RegionMasked(MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False))
    if key in ("ours-wasserstein", "monai-wasserstein"):
        return _Wasserstein(key.split("-")[0])
    if key == "monai-tversky":
        from monai.losses import TverskyLoss

        return TverskyLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)
    if key.startswith("monai-"):
        from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, GeneralizedDiceLoss

        cls = {"monai-dice": DiceLoss, "monai-gdl": GeneralizedDiceLoss, "monai-dicece": DiceCELoss,
               "monai-dicefocal": DiceFocalLoss}[key]  # fmt: skip
        return cls(to_onehot_y=True, softmax=True)
    if key == "nnunet-memeff":
        return _nnunet_memeff()
    raise ValueError(f"`losses` entries must be one of {LOSSES}, got {key!r}.")


def _nnunet_memeff() -> torch.nn.Module:
    try:
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    except ImportError as e:
        raise Unavailable(f"not installed ({e})") from None
    except Exception as e:  # an nnU-Net release this code does not know
        raise Unavailable(f"not importable ({type(e).__name__}: {e})") from None
    # As nnU-Net's trainer builds it for a label map without regions (DC_and_CE_loss): softmax over channels,
    # batch Dice, background dropped, smooth 1e-5; ddp off in a single process. Target: (B, 1, *S) labels.
    return MemoryEfficientSoftDiceLoss(apply_nonlin=_softmax_dim1, batch_dice=True, do_bg=False, smooth=1e-5, ddp=False)


def availability(key: str) -> str:
    """``"ok"`` or why the implementation cannot be built."""
    try:
        build_loss(key)
    except Unavailable as e:
        return str(e)
    except Exception as e:
        return error_text(e)
    return "ok"


def error_text(e: BaseException) -> str:
    """``"error: <type>: <message>"`` on one line: the status of a row whose implementation or child failed."""
    text = f"error: {type(e).__name__}: {e}".strip()
    return text.splitlines()[0] if text else "error"


def resolve_losses(losses: Iterable[str] | None) -> list[str]:
    """The keys that ``losses`` names (keys, groups, comma-separated text), each once, in :data:`LOSSES` order."""
    if losses is None:
        return list(LOSSES)
    if isinstance(losses, str):
        losses = [losses]
    keys: list[str] = []
    for entry in losses:
        for name in (n.strip() for n in str(entry).split(",")):
            if not name:
                continue
            name = check_option("losses", name, (*LOSSES, *LOSS_GROUPS))
            for key in LOSS_GROUPS.get(name, (name,)):
                if key not in keys:
                    keys.append(key)
    if not keys:
        raise ValueError(f"`losses` must name at least one of {LOSSES}, got {losses!r}.")
    return [k for k in LOSSES if k in keys]  # fixed order: ours, MONAI, nnU-Net
