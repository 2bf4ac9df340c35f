"""Data for the bundle and the CLI: synthetic class-imbalanced 3D volumes, and Decathlon-format folders.

Two sources feed the same bundle (``monai_gdl_plus/app/configs/train.yaml``):

- :func:`make_synthetic` generates volumes in memory: a large "organ" (class 1), medium structures, and a small
  "lesion" inside the organ (the last class, about 0.3% of the voxels), on a noisy background.
- :func:`load_decathlon` reads and checks a Medical Segmentation Decathlon folder (``dataset.json``, ``imagesTr/``,
  ``labelsTr/``, NIfTI read with nibabel); every problem is a :class:`DatasetError` with a one-line message.

:func:`bundle_data` picks one of the two and splits it into training and validation items.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_gdl_plus.app.common import check_int

__all__ = [
    "BundleData",
    "DatasetError",
    "DecathlonDataset",
    "bundle_data",
    "load_decathlon",
    "make_synthetic",
    "split_items",
    "synthetic_class_names",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MAX_SYNTHETIC_CLASSES = 8


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message is one line meant for the user."""


# ------------------------------------------------------------------------------------------------ synthetic data


def _spatial_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    dims = (size,) * 3 if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else tuple(size)  # type: ignore[arg-type]
    if len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 8 for d in dims):
        raise ValueError(f"`size` must be an int or 3 ints, each >= 8, got {size!r}.")
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


def _ellipsoid(grid: tuple[np.ndarray, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=False)) <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], passes: int = 2) -> np.ndarray:
    # box-blurred white noise: spatially correlated texture, so single voxels cannot be classified in isolation
    x = rng.standard_normal(shape).astype(np.float32)
    for _ in range(passes):
        for axis in range(3):
            x = (np.roll(x, 1, axis) + x + np.roll(x, -1, axis)) / 3.0
    return x / (x.std() + 1e-6)


def make_synthetic(
    num_samples: int = 16,
    size: int | Sequence[int] = 32,
    num_classes: int = 4,
    *,
    seed: int = 0,
    noise: float = 0.4,
    rare_fraction: float = 0.003,
    lesion_contrast: float = 1.0,
) -> list[dict[str, np.ndarray]]:
    """Synthetic class-imbalanced 3D segmentation volumes, generated in memory.

    Class 1 is a large ellipsoid ("organ", ~10% of voxels), classes 2..C-2 medium ellipsoids (~1.5% each) and the
    last class C-1 a small sphere inside the organ ("lesion", about ``rare_fraction`` of the voxels, always present).
    Mean intensities: background 0, organ 1, structures 2, 2.5, ..., lesion ``1 + lesion_contrast`` (by default as
    bright as structure 2: only its context, small and inside the organ, tells it apart); spatially correlated noise
    of standard deviation ``noise`` (plus white noise of half that) is added.

    Args:
        num_samples: number of volumes.
        size: edge of the cubic volume, or three edges (each >= 8).
        num_classes: classes including background, 2..8 (2 = background and the rare lesion only).
        seed: seed of the generator; the same arguments give the same volumes.
        noise: standard deviation of the added noise.
        rare_fraction: target fraction of voxels of the last class (at least one voxel).
        lesion_contrast: lesion mean intensity minus the organ's.

    Returns:
        A list of ``{"image": float32 (1, D, H, W), "label": int64 (1, D, H, W)}`` dicts.

    Raises:
        ValueError: a size, count or fraction out of range.
        TypeError: a count that is not an int.
    """
    num_samples = check_int("num_samples", num_samples, 1)
    num_classes = check_int("num_classes", num_classes, 2, MAX_SYNTHETIC_CLASSES)
    shape = _spatial_size(size)
    if not 0.0 < float(rare_fraction) < 0.05:
        raise ValueError(f"`rare_fraction` must be in (0, 0.05), got {rare_fraction!r}.")
    if not float(noise) >= 0.0:
        raise ValueError(f"`noise` must be >= 0, got {noise!r}.")
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    dims = np.asarray(shape, dtype=np.float32)
    lesion_mean = 1.0 + float(lesion_contrast)
    means = [0.0, 1.0] + [2.0 + 0.5 * k for k in range(num_classes - 3)] + [lesion_mean]
    means = means if num_classes > 2 else [0.0, lesion_mean]
    lesion_radius = max((3.0 * rare_fraction * float(np.prod(dims)) / (4.0 * math.pi)) ** (1.0 / 3.0), 0.75)
    out: list[dict[str, np.ndarray]] = []
    for _ in range(num_samples):
        label = np.zeros(shape, dtype=np.int64)
        organ_center = dims / 2 + rng.uniform(-0.08, 0.08, 3) * dims
        organ_radii = rng.uniform(0.24, 0.32, 3) * dims
        organ = _ellipsoid(grid, organ_center, organ_radii)
        if num_classes > 2:
            label[organ] = 1
        for k in range(2, num_classes - 1):
            center = rng.uniform(0.2, 0.8, 3) * dims
            label[_ellipsoid(grid, center, rng.uniform(0.1, 0.16, 3) * dims)] = k
        # the lesion: a sphere well inside the organ, so it is present in every volume and never overwritten
        offset = rng.uniform(-0.4, 0.4, 3) * organ_radii
        center = np.round(organ_center + offset)
        lesion = _ellipsoid(grid, center, np.full(3, lesion_radius, dtype=np.float32))
        lesion[tuple(np.clip(center.astype(int), 0, np.asarray(shape) - 1))] = True
        label[lesion] = num_classes - 1
        image = np.asarray(means, dtype=np.float32)[label]
        image += float(noise) * _smooth_noise(rng, shape)
        image += float(noise) * 0.5 * rng.standard_normal(shape).astype(np.float32)
        out.append({"image": image[None], "label": label[None]})
    return out


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of :func:`make_synthetic`'s classes: background, organ, structure2.., lesion (the rare last class)."""
    num_classes = check_int("num_classes", num_classes, 2, MAX_SYNTHETIC_CLASSES)
    middle = (("organ",) if num_classes > 2 else ()) + tuple(f"structure{k}" for k in range(2, num_classes - 1))
    return ("background",) + middle + ("lesion",)


# ------------------------------------------------------------------------------------------------ Decathlon


@dataclass(frozen=True)
class DecathlonDataset:
    """A checked Decathlon-format dataset.

    Attributes:
        root: the dataset folder.
        name: ``dataset.json``'s ``name`` (the folder name if absent).
        class_names: one name per class index 0..C-1 (``labels`` of ``dataset.json``).
        in_channels: image channels (``modality`` / ``channel_names``, else read from the first image header).
        items: ``{"image": path, "label": path}`` dicts of the training cases, absolute paths.
        class_voxels: voxels per class over all training labels (None when the labels were not read).
    """

    root: Path
    name: str
    class_names: tuple[str, ...]
    in_channels: int
    items: tuple[dict[str, str], ...] = field(repr=False)
    class_voxels: tuple[int, ...] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes C, background included."""
        return len(self.class_names)


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def _strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parse_labels(labels: Any) -> tuple[str, ...]:
    """``labels`` as MSD (``{"0": "background", "1": "liver"}``) or nnU-Net v2 (``{"background": 0, ...}``)."""
    if not isinstance(labels, Mapping) or not labels:
        raise DatasetError(f"dataset.json: 'labels' must be a non-empty object of class index -> name, got {labels!r}")
    by_index: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).strip().lstrip("-").isdigit():  # MSD: index -> name
            index, name = int(key), str(value)
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: name -> index
            index, name = value, str(key)
        else:
            raise DatasetError(
                f"dataset.json: 'labels' entry {key!r}: {value!r} is neither 'index': 'name' nor 'name': index "
                "(region-based labels are not supported)"
            )
        if index in by_index:
            raise DatasetError(f"dataset.json: class index {index} appears twice in 'labels'")
        by_index[index] = name
    indices = sorted(by_index)
    if indices != list(range(len(indices))):
        raise DatasetError(f"dataset.json: 'labels' indices must be 0..{len(indices) - 1} without gaps, got {indices}")
    if len(indices) < 2:
        raise DatasetError(f"dataset.json: 'labels' must define at least 2 classes (background and one), got {indices}")
    return tuple(by_index[i] for i in indices)


def _resolve(root: Path, entry: Any, what: str, index: int) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DatasetError(f"dataset.json: training[{index}] has no valid '{what}' path, got {entry!r}")
    path = (root / entry).resolve() if not Path(entry).is_absolute() else Path(entry)
    if not path.is_file():
        raise DatasetError(f"dataset.json: training[{index}] {what} {entry!r} does not exist under {root}")
    return path


def _discover(root: Path) -> list[dict[str, str]]:
    """Pair imagesTr/*.nii(.gz) with labelsTr/ by name: ``case.nii.gz`` (MSD) or ``case_0000.nii.gz`` (nnU-Net)."""
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DatasetError(f"{root}: dataset.json has no 'training' list and there is no {d.name}/ folder")
    labels = {_strip_nifti(p.name): p for p in sorted(labels_dir.iterdir()) if _is_nifti(p)}
    items = []
    for image in sorted(images_dir.iterdir()):
        if not _is_nifti(image) or image.name.startswith("."):
            continue
        case = _strip_nifti(image.name)
        if case not in labels and case.endswith("_0000"):
            case = case[: -len("_0000")]
        elif case not in labels and case[-5:-4] == "_" and case[-4:].isdigit() and case[:-5] in labels:
            raise DatasetError(
                f"{root}: imagesTr/{image.name} is a second channel file in nnU-Net v2's one-file-per-channel layout, "
                "which is not supported; stack each case's channels into one 4D NIfTI (channels last), as MSD does"
            )
        if case not in labels:
            raise DatasetError(f"{root}: image imagesTr/{image.name} has no label in labelsTr/")
        items.append({"image": str(image.resolve()), "label": str(labels[case].resolve())})
    return items


def _nifti_shape(path: str) -> tuple[int, ...]:
    import nibabel as nib

    try:
        img: Any = nib.load(path)  # a spatial image (nibabel's load is typed as the base class)
        return tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DatasetError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from None


def _check_label_file(path: str, num_classes: int, image_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Check that a label volume holds integer class indices in [0, num_classes) and matches its image.

    Args:
        path: NIfTI label file.
        num_classes: number of classes C defined by ``dataset.json``.
        image_shape: the image's shape from its header, whose first three dimensions must equal the label's.

    Returns:
        Voxel count per class, int64 (num_classes,).

    Raises:
        DatasetError: unreadable file, non-integer or out-of-range values, or a shape mismatch.
    """
    import nibabel as nib

    try:
        img: Any = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DatasetError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from None
    shape = tuple(int(s) for s in data.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DatasetError(f"label {path} must be a 3D volume, got shape {shape}")
    if image_shape is not None and tuple(image_shape[:3]) != shape:
        raise DatasetError(f"label {path} has shape {shape} but its image has shape {tuple(image_shape)}")
    if data.size == 0:
        raise DatasetError(f"label {path} is empty")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data) & (data == np.round(data))):
        raise DatasetError(f"label {path} holds non-integer values; expected class indices 0..{num_classes - 1}")
    lo, hi = data.min(), data.max()
    if lo < 0 or hi >= num_classes:
        bad = int(hi) if hi >= num_classes else int(lo)
        raise DatasetError(
            f"label {path} contains class {bad}, but dataset.json 'labels' defines {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    return np.bincount(np.asarray(data, dtype=np.int64).ravel(), minlength=num_classes)


def load_decathlon(data_dir: str | Path, *, check_labels: bool = True) -> DecathlonDataset:
    """Read and check a Medical Segmentation Decathlon folder.

    Accepts MSD's ``dataset.json`` (``labels`` as ``{"0": "background", ...}``, ``modality``, a ``training`` list of
    ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``) and nnU-Net v2's (``labels`` as
    ``{"background": 0, ...}``, ``channel_names``; no ``training`` list, cases found in imagesTr/labelsTr).

    Args:
        data_dir: the dataset folder (holding ``dataset.json``).
        check_labels: read every label file and check its values are class indices in [0, C) and its shape equals
            its image's (one pass over the labels; headers only for images).

    Returns:
        A :class:`DecathlonDataset`.

    Raises:
        DatasetError: a missing folder or file, malformed ``dataset.json``, or a label file that fails the checks;
            the message is one line.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder {str(root)!r} does not exist or is not a directory")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(
            f"{root}: no dataset.json (expected a Decathlon-format folder: dataset.json, imagesTr/, labelsTr/)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{meta_path}: cannot read: {e}") from None
    if not isinstance(meta, Mapping):
        raise DatasetError(f"{meta_path}: expected a JSON object at the top level, got {type(meta).__name__}")
    if "labels" not in meta:
        raise DatasetError(f"{meta_path}: missing the 'labels' entry (class index -> name)")
    class_names = _parse_labels(meta["labels"])

    training = meta.get("training")
    if training is None:
        items = _discover(root)
    else:
        if not isinstance(training, list):
            raise DatasetError(f"{meta_path}: 'training' must be a list of {{'image', 'label'}} objects")
        items = []
        for i, entry in enumerate(training):
            if not isinstance(entry, Mapping):
                raise DatasetError(f"{meta_path}: training[{i}] must be an object with 'image' and 'label'")
            image = _resolve(root, entry.get("image"), "image", i)
            items.append({"image": str(image), "label": str(_resolve(root, entry.get("label"), "label", i))})
    if not items:
        raise DatasetError(f"{root}: no training cases (empty 'training' list or imagesTr/)")

    channels_meta = meta.get("modality", meta.get("channel_names"))
    first_shape = _nifti_shape(items[0]["image"])
    if len(first_shape) not in (3, 4):
        raise DatasetError(f"image {items[0]['image']} must be 3D or 4D (channels last), got shape {first_shape}")
    in_channels = first_shape[3] if len(first_shape) == 4 else 1
    if isinstance(channels_meta, Mapping) and channels_meta and len(channels_meta) != in_channels:
        raise DatasetError(
            f"{meta_path}: {len(channels_meta)} channels in 'modality'/'channel_names' but image "
            f"{items[0]['image']} has {in_channels} (shape {first_shape})"
        )
    class_voxels = None
    if check_labels:
        counts = np.zeros(len(class_names), dtype=np.int64)
        for item in items:
            shape = first_shape if item is items[0] else _nifti_shape(item["image"])
            channels = shape[3] if len(shape) == 4 else 1
            if len(shape) not in (3, 4) or channels != in_channels:
                raise DatasetError(
                    f"image {item['image']} has shape {shape}: every image must be 3D or 4D with {in_channels} "
                    f"channel(s), like {items[0]['image']}"
                )
            counts += _check_label_file(item["label"], len(class_names), shape)
        class_voxels = tuple(int(c) for c in counts)
    name = str(meta.get("name") or root.name)
    return DecathlonDataset(root, name, class_names, in_channels, tuple(items), class_voxels)


# ------------------------------------------------------------------------------------------------ bundle glue


@dataclass(frozen=True)
class BundleData:
    """What the bundle needs from a data source.

    Attributes:
        train: training items (dicts with "image" and "label": arrays for synthetic data, file paths otherwise).
        val: validation items, same form.
        num_classes: classes including background.
        in_channels: image channels.
        class_names: one name per class.
        source: ``"synthetic"`` or the dataset folder.
        rare_class: index of the rarest foreground class (synthetic: the lesion, C-1; Decathlon: fewest labelled
            voxels when the labels were read, else the last class).
    """

    train: list[dict[str, Any]] = field(repr=False)
    val: list[dict[str, Any]] = field(repr=False)
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    source: str
    rare_class: int


def split_items(items: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded split into training and validation items.

    Args:
        items: the cases.
        val_fraction: share of cases used for validation, in [0, 1); at least one case goes to validation. With a
            single case, it is used for both.
        seed: shuffling seed.

    Returns:
        ``(train, val)`` lists.

    Raises:
        ValueError: ``val_fraction`` outside [0, 1) or no items.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
    items = list(items)
    if not items:
        raise ValueError("`items` must hold at least one case, got none.")
    if len(items) == 1:
        return items, items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(val_fraction * len(items))), len(items) - 1)
    val_idx = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def bundle_data(
    data_dir: str | Path | None = None,
    *,
    synthetic: Mapping[str, Any] | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    check_labels: bool = True,
) -> BundleData:
    """The bundle's data: synthetic volumes when ``data_dir`` is None (or empty), else a Decathlon folder.

    Args:
        data_dir: Decathlon-format folder, or None for synthetic data.
        synthetic: keyword arguments of :func:`make_synthetic` (``num_samples``, ``size``, ``num_classes``, ...).
        val_fraction: share of cases for validation (see :func:`split_items`).
        seed: seed of the generator and of the split.
        check_labels: check every label file of a Decathlon folder (see :func:`load_decathlon`).

    Returns:
        A :class:`BundleData`.

    Raises:
        DatasetError: see :func:`load_decathlon`.
        ValueError: bad synthetic arguments or ``val_fraction``.
    """
    if data_dir is None or str(data_dir) == "":
        kwargs = dict(synthetic or {})
        kwargs.setdefault("seed", seed)
        items = make_synthetic(**kwargs)
        num_classes = int(kwargs.get("num_classes", 4))
        names = synthetic_class_names(num_classes)
        train, val = split_items(items, val_fraction, seed)
        return BundleData(train, val, num_classes, 1, names, "synthetic", num_classes - 1)
    ds = load_decathlon(data_dir, check_labels=check_labels)
    train, val = split_items(ds.items, val_fraction, seed)
    rare = ds.num_classes - 1
    if ds.class_voxels is not None:
        rare = 1 + int(np.argmin(ds.class_voxels[1:]))
    return BundleData(train, val, ds.num_classes, ds.in_channels, ds.class_names, str(ds.root), rare)
