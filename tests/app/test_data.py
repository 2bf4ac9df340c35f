"""Tests of monai_gdl_plus.app.data: the synthetic generator, Decathlon folders and the bundle glue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monai_gdl_plus.app.data import (
    BundleData,
    DatasetError,
    bundle_data,
    load_decathlon,
    make_synthetic,
    split_items,
    synthetic_class_names,
)

nib = pytest.importorskip("nibabel")


# ------------------------------------------------------------------------------------------------ helpers


def write_decathlon(
    root: Path,
    num_cases: int = 2,
    size: int = 16,
    num_classes: int = 3,
    *,
    style: str = "msd",
    channels: int = 1,
    seed: int = 0,
) -> Path:
    """A tiny Decathlon folder: ``num_cases`` NIfTI images and labels, and its dataset.json.

    ``style="msd"``: labels ``{"0": "background", ...}``, ``modality``, a ``training`` list, ``case_N.nii.gz`` files.
    ``style="nnunet"``: labels ``{"background": 0, ...}``, ``channel_names``, no list, images ``case_N_0000.nii.gz``.
    Every label holds every class (a cube per class), so class voxel counts are known.
    """
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    names = ["background"] + [f"c{k}" for k in range(1, num_classes)]
    training = []
    for i in range(num_cases):
        label = np.zeros((size,) * 3, dtype=np.uint8)
        for k in range(1, num_classes):
            lo = 2 + 3 * (k - 1)
            label[lo : lo + 3, lo : lo + 3, 2:5] = k
        shape = (size,) * 3 + ((channels,) if channels > 1 else ())
        image = rng.normal(size=shape).astype(np.float32) + (label[..., None] if channels > 1 else label)
        image_name = f"case_{i}_0000.nii.gz" if style == "nnunet" else f"case_{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / image_name))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"case_{i}.nii.gz"))
        training.append({"image": f"./imagesTr/{image_name}", "label": f"./labelsTr/case_{i}.nii.gz"})
    if style == "nnunet":
        meta = {
            "name": "Tiny",
            "labels": {n: k for k, n in enumerate(names)},
            "channel_names": {str(c): "CT" for c in range(channels)},
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
        }
    else:
        meta = {
            "name": "Tiny",
            "labels": {str(k): n for k, n in enumerate(names)},
            "modality": {str(c): "CT" for c in range(channels)},
            "numTraining": num_cases,
            "training": training,
        }
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def _set_label(root: Path, case: int, values: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(root / "labelsTr" / f"case_{case}.nii.gz"))


def _edit_meta(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (root / "dataset.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_shapes_dtypes_and_every_class_present():
    items = make_synthetic(3, size=16, num_classes=4, seed=1)
    assert len(items) == 3
    for item in items:
        assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == np.float32
        assert item["label"].shape == (1, 16, 16, 16) and item["label"].dtype == np.int64
        assert set(np.unique(item["label"]).tolist()) == {0, 1, 2, 3}
        assert np.isfinite(item["image"]).all()


@pytest.mark.parametrize("size", [16, 32])
def test_synthetic_rare_class_is_well_under_one_percent_and_the_rarest(size):
    items = make_synthetic(4, size=size, num_classes=4, seed=0)
    labels = np.stack([x["label"] for x in items])
    counts = np.bincount(labels.ravel(), minlength=4)
    share = counts / labels.size
    assert 0 < share[3] < 0.006  # "well under 1%"
    assert counts[3] == counts[1:].min()
    assert share[1] > 10 * share[3]  # the organ dwarfs the lesion: a real imbalance
    for x in items:  # present in every volume, not only on average
        assert (x["label"] == 3).any()


def test_synthetic_classes_differ_in_intensity():
    items = make_synthetic(2, size=24, num_classes=4, seed=3, noise=0.0)
    image, label = items[0]["image"][0], items[0]["label"][0]
    means = [float(image[label == k].mean()) for k in range(4)]
    assert means[0] < means[1] < means[3]  # background < organ < lesion (lesion_contrast > 0)


def test_synthetic_is_deterministic_per_seed():
    a, b, c = (make_synthetic(2, size=16, seed=s) for s in (5, 5, 6))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])


@pytest.mark.parametrize("num_classes", [2, 3, 6])
def test_synthetic_other_class_counts(num_classes):
    items = make_synthetic(2, size=(16, 24, 16), num_classes=num_classes, seed=0)
    assert items[0]["label"].shape == (1, 16, 24, 16)
    assert items[0]["label"].max() == num_classes - 1
    names = synthetic_class_names(num_classes)
    assert len(names) == num_classes and names[0] == "background" and names[-1] == "lesion"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 9}, ValueError, r"`num_classes` must be in \[2, 8\], got 9"),
        ({"num_classes": 1}, ValueError, r"`num_classes` must be in \[2, 8\], got 1"),
        ({"num_samples": 0}, ValueError, r"`num_samples` must be >= 1, got 0"),
        ({"num_samples": 2.0}, TypeError, r"`num_samples` must be an int, got float"),
        ({"size": 4}, ValueError, r"`size` must be an int or 3 ints, each >= 8, got 4"),
        ({"size": (16, 16)}, ValueError, r"`size` must be an int or 3 ints"),
        ({"rare_fraction": 0.2}, ValueError, r"`rare_fraction` must be in \(0, 0.05\), got 0.2"),
        ({"noise": -1.0}, ValueError, r"`noise` must be >= 0, got -1.0"),
    ],
)
def test_synthetic_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_synthetic(**kwargs)


# ------------------------------------------------------------------------------------------------ split


def test_split_items_is_a_seeded_partition():
    items = list(range(10))
    train, val = split_items(items, 0.25, seed=0)
    assert sorted(train + val) == items and not set(train) & set(val)
    assert len(val) == round(0.25 * 10)
    assert split_items(items, 0.25, seed=0) == (train, val)
    assert split_items(items, 0.25, seed=1) != (train, val)


def test_split_items_edge_cases():
    assert split_items(["a"], 0.25, seed=0) == (["a"], ["a"])  # one case: used for both
    train, val = split_items(["a", "b"], 0.0, seed=0)  # at least one validation case, at least one training case
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \[0, 1\), got 1.0"):
        split_items(["a", "b"], 1.0, seed=0)
    with pytest.raises(ValueError, match="`items` must hold at least one case"):
        split_items([], 0.5, seed=0)


# ------------------------------------------------------------------------------------------------ Decathlon


def test_load_decathlon_msd_format(tmp_path):
    root = write_decathlon(tmp_path / "Task", num_cases=2, size=12, num_classes=3)
    ds = load_decathlon(root)
    assert ds.name == "Tiny" and ds.class_names == ("background", "c1", "c2") and ds.num_classes == 3
    assert ds.in_channels == 1 and len(ds.items) == 2
    for item in ds.items:
        assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
    expected = np.zeros(3, dtype=np.int64)
    for i in range(2):
        expected += np.bincount(nib.load(str(root / "labelsTr" / f"case_{i}.nii.gz")).get_fdata().astype(int).ravel())
    assert ds.class_voxels == tuple(int(c) for c in expected)


def test_load_decathlon_nnunet_format_discovers_cases(tmp_path):
    root = write_decathlon(tmp_path / "Dataset001", num_cases=2, size=12, style="nnunet")
    ds = load_decathlon(root)
    assert ds.class_names == ("background", "c1", "c2")
    assert [Path(i["image"]).name for i in ds.items] == ["case_0_0000.nii.gz", "case_1_0000.nii.gz"]
    assert [Path(i["label"]).name for i in ds.items] == ["case_0.nii.gz", "case_1.nii.gz"]


def test_load_decathlon_nnunet_one_file_per_channel_is_named_as_unsupported(tmp_path):
    root = write_decathlon(tmp_path / "Dataset002", num_cases=1, size=12, style="nnunet")
    second = root / "imagesTr" / "case_0_0001.nii.gz"
    second.write_bytes((root / "imagesTr" / "case_0_0000.nii.gz").read_bytes())
    _edit_meta(root, channel_names={"0": "T1", "1": "T2"})
    with pytest.raises(DatasetError, match=r"case_0_0001.nii.gz is a second channel file .* one 4D NIfTI"):
        load_decathlon(root)
    # a four-digit suffix whose case has no label is a missing label, not a channel file
    second.rename(root / "imagesTr" / "other_0001.nii.gz")
    with pytest.raises(DatasetError, match=r"imagesTr/other_0001.nii.gz has no label in labelsTr/"):
        load_decathlon(root)


def test_load_decathlon_multichannel_images(tmp_path):
    root = write_decathlon(tmp_path / "T", num_cases=1, size=12, channels=2)
    assert load_decathlon(root).in_channels == 2
    _edit_meta(root, modality={"0": "T1"})
    with pytest.raises(DatasetError, match=r"1 channels in 'modality'/'channel_names' but image .* has 2"):
        load_decathlon(root)


def test_load_decathlon_without_label_check_skips_counts(tmp_path):
    root = write_decathlon(tmp_path / "T", num_cases=1, size=12)
    _set_label(root, 0, np.full((12, 12, 12), 7, dtype=np.uint8))
    assert load_decathlon(root, check_labels=False).class_voxels is None  # not read, so not rejected


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("no_dir", r"data folder .* does not exist or is not a directory"),
        ("no_json", r"no dataset.json \(expected a Decathlon-format folder"),
        ("bad_json", r"dataset.json: malformed JSON: .* at line 1"),
        ("json_list", r"expected a JSON object at the top level, got list"),
        ("no_labels", r"missing the 'labels' entry"),
        ("label_gap", r"'labels' indices must be 0..1 without gaps, got \[0, 2\]"),
        ("label_region", r"'labels' entry 'c1': \[1, 2\] is neither"),
        ("one_label", r"'labels' must define at least 2 classes"),
        ("missing_image", r"training\[1\] image './imagesTr/case_1.nii.gz' does not exist"),
        ("training_not_list", r"'training' must be a list"),
        ("empty_training", r"no training cases"),
        ("class_beyond", r"contains class 5, but dataset.json 'labels' defines 3 classes \(0..2\)"),
        ("negative_label", r"contains class -1, but dataset.json 'labels' defines 3 classes"),
        ("float_label", r"holds non-integer values; expected class indices 0..2"),
        ("shape_mismatch", r"has shape \(10, 10, 10\) but its image has shape \(12, 12, 12\)"),
        ("bad_nifti", r"cannot read NIfTI file .*case_0.nii.gz"),
    ],
)
def test_load_decathlon_errors(tmp_path, breakage, match):
    root = write_decathlon(tmp_path / "T", num_cases=2, size=12, num_classes=3)
    if breakage == "no_dir":
        root = tmp_path / "nowhere"
    elif breakage == "no_json":
        (root / "dataset.json").unlink()
    elif breakage == "bad_json":
        (root / "dataset.json").write_text('{"labels": {"0": "bg",}')
    elif breakage == "json_list":
        (root / "dataset.json").write_text("[1, 2]")
    elif breakage == "no_labels":
        _edit_meta(root, labels=None)
    elif breakage == "label_gap":
        _edit_meta(root, labels={"0": "background", "2": "c2"})
    elif breakage == "label_region":
        _edit_meta(root, labels={"background": 0, "c1": [1, 2]})
    elif breakage == "one_label":
        _edit_meta(root, labels={"0": "background"})
    elif breakage == "missing_image":
        (root / "imagesTr" / "case_1.nii.gz").unlink()
    elif breakage == "training_not_list":
        _edit_meta(root, training={"image": "x"})
    elif breakage == "empty_training":
        _edit_meta(root, training=[])
    elif breakage == "class_beyond":
        values = np.zeros((12, 12, 12), dtype=np.uint8)
        values[0, 0, 0] = 5
        _set_label(root, 1, values)
    elif breakage == "negative_label":
        values = np.zeros((12, 12, 12), dtype=np.int16)
        values[0, 0, 0] = -1
        _set_label(root, 1, values)
    elif breakage == "float_label":
        _set_label(root, 0, np.full((12, 12, 12), 0.5, dtype=np.float32))
    elif breakage == "shape_mismatch":
        _set_label(root, 0, np.zeros((10, 10, 10), dtype=np.uint8))
    elif breakage == "bad_nifti":
        (root / "labelsTr" / "case_0.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DatasetError, match=match) as info:
        load_decathlon(root)
    assert "\n" not in str(info.value)  # one line, meant for the CLI's stderr


def test_nnunet_discovery_errors(tmp_path):
    root = write_decathlon(tmp_path / "D", num_cases=2, size=12, style="nnunet")
    (root / "labelsTr" / "case_1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"image imagesTr/case_1_0000.nii.gz has no label in labelsTr/"):
        load_decathlon(root)
    (root / "labelsTr").rename(root / "elsewhere")
    with pytest.raises(DatasetError, match=r"no 'training' list and there is no labelsTr/ folder"):
        load_decathlon(root)


# ------------------------------------------------------------------------------------------------ bundle glue


def test_bundle_data_synthetic():
    data = bundle_data(None, synthetic={"num_samples": 4, "size": 16, "num_classes": 4}, val_fraction=0.25, seed=0)
    assert isinstance(data, BundleData)
    assert (len(data.train), len(data.val)) == (3, 1)
    assert data.num_classes == 4 and data.in_channels == 1 and data.source == "synthetic"
    assert data.class_names == synthetic_class_names(4) and data.rare_class == 3
    assert bundle_data("", synthetic={"num_samples": 2, "size": 16}).source == "synthetic"  # "" = no folder


def test_bundle_data_decathlon_picks_rarest_class(tmp_path):
    root = write_decathlon(tmp_path / "T", num_cases=3, size=12, num_classes=3)
    values = np.zeros((12, 12, 12), dtype=np.uint8)
    values[:6] = 2  # class 2 becomes common: class 1 is now the rarest, not the last class
    _set_label(root, 0, values)
    data = bundle_data(root, val_fraction=0.34, seed=0)
    assert data.source == str(root) and data.num_classes == 3 and data.in_channels == 1
    assert (len(data.train), len(data.val)) == (2, 1)
    assert data.rare_class == 1
    assert all(isinstance(x["image"], str) for x in data.train + data.val)


def test_load_decathlon_rejects_an_image_with_another_channel_count(tmp_path):
    root = write_decathlon(tmp_path / "mixed", num_cases=3, channels=2)
    odd = np.zeros((16, 16, 16, 3), dtype=np.float32)
    nib.save(nib.Nifti1Image(odd, np.eye(4)), str(root / "imagesTr" / "case_2.nii.gz"))
    with pytest.raises(DatasetError, match=r"case_2.nii.gz has shape \(16, 16, 16, 3\).*2 channel"):
        load_decathlon(root)
