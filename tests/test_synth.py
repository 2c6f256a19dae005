"""Synthetic datasets: upstream layouts read back with agcl.data.formats, determinism, difficulty."""

from __future__ import annotations

import re
import zipfile

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from agcl.data.formats import (
    acdc_frame_files,
    la_case_path,
    parse_slice_name,
    read_crag_pair,
    read_h5_volume,
    read_list,
)
from agcl.data.specs import SPECS
from agcl.data.synth import synth_acdc, synth_crag, synth_la


def best_threshold_dice(image: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of `image > t` or `image < t` over all thresholds t (ties aside)."""
    values, target = image.ravel(), target.ravel().astype(bool)
    counts = np.arange(1, values.size + 1)
    best = 0.0
    for order in (np.argsort(-values), np.argsort(values)):
        true_positives = np.cumsum(target[order])
        best = max(best, float((2 * true_positives / (counts + target.sum())).max()))
    return best


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_best_threshold_dice_helper():
    image = np.array([0.1, 0.9, 0.8, 0.2, 0.7])
    assert best_threshold_dice(image, np.array([0, 1, 1, 0, 0])) == pytest.approx(1.0)
    # target {0.1, 0.9, 0.8}: "> 0.75" gives 2*2/(2+3) = 0.8, beating "> 0" (6/8) and "< 0.15" (2/4)
    assert best_threshold_dice(image, np.array([1, 1, 1, 0, 0])) == pytest.approx(0.8)


# --- LA -----------------------------------------------------------------------------------------


def test_la_layout_reads_back(tmp_path):
    out = synth_la(tmp_path, seed=3, n_train=3, n_test=2, size_xy=(30, 36), size_z=16)
    assert out == tmp_path
    train, test = read_list(out / "train.list"), read_list(out / "test.list")
    assert len(train) == 3 and len(test) == 2 and not set(train) & set(test)
    assert all(re.fullmatch(r"[A-Z0-9]{20}", case) for case in train + test)
    cases = sorted(p.name for p in (out / "2018LA_Seg_Training Set").iterdir())
    assert cases == sorted(train + test)
    for case in train + test:
        path = la_case_path(out, case)
        image, label = read_h5_volume(path, label_values={0, 1})
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert 30 <= image.shape[0] <= 36 and 30 <= image.shape[1] <= 36
        assert image.shape[2] == 16
        assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-3
        assert set(np.unique(label).tolist()) == {0, 1}
        with h5py.File(path, "r") as h5:
            assert set(h5.keys()) == {"image", "label"}
            for key in ("image", "label"):
                assert h5[key].compression == "gzip" and h5[key].compression_opts == 4
                assert h5[key].chunks is not None


def test_la_deterministic(tmp_path):
    kwargs = {"n_train": 2, "n_test": 1, "size_xy": (24, 30), "size_z": 12}
    first = synth_la(tmp_path / "a", seed=5, **kwargs)
    second = synth_la(tmp_path / "b", seed=5, **kwargs)
    other = synth_la(tmp_path / "c", seed=6, **kwargs)
    ids = read_list(first / "train.list") + read_list(first / "test.list")
    assert ids == read_list(second / "train.list") + read_list(second / "test.list")
    assert not set(ids) & set(read_list(other / "train.list"))
    for case in ids:
        a, b = read_h5_volume(la_case_path(first, case)), read_h5_volume(la_case_path(second, case))
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
        assert la_case_path(first, case).read_bytes() == la_case_path(second, case).read_bytes()
    other_case = read_list(other / "train.list")[0]
    assert not np.array_equal(read_h5_volume(la_case_path(first, ids[0]))[1],
                              read_h5_volume(la_case_path(other, other_case))[1])


def test_la_needs_shape_not_threshold(tmp_path):
    out = synth_la(tmp_path, seed=0, n_train=3, n_test=1)
    oracle = []
    for case in read_list(out / "train.list") + read_list(out / "test.list"):
        image, label = read_h5_volume(la_case_path(out, case))
        target = label.astype(bool)
        assert 0.05 <= target.mean() <= 0.15
        components, _ = ndimage.label(target)
        assert np.bincount(components.ravel())[1:].max() >= 0.95 * target.sum()
        assert best_threshold_dice(image, target) < 0.7
        # What a network can learn: smooth away noise and texture, keep the largest blob.
        smooth = ndimage.gaussian_filter(image, 1.5)
        best = 0.0
        for quantile in np.linspace(0.8, 0.95, 7):
            blobs, _ = ndimage.label(smooth > np.quantile(smooth, quantile))
            largest = blobs == np.argmax(np.bincount(blobs.ravel())[1:]) + 1
            best = max(best, dice(largest, target))
        oracle.append(best)
    assert np.mean(oracle) > 0.8


# --- ACDC ---------------------------------------------------------------------------------------


def test_acdc_layout_reads_back(tmp_path):
    out = synth_acdc(tmp_path, seed=1, n_train_patients=3, n_val_patients=1, n_test_patients=2,
                     slices=(5, 7), size_hw=(40, 48))
    splits = {s: read_list(out / f"{s}.list") for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 4]
    patients = {s: [name[:10] for name in ids[0::2]] for s, ids in splits.items()}
    for split, ids in splits.items():
        assert ids == [f"{p}_{f}" for p in patients[split] for f in ("frame01", "frame02")]
    everyone = patients["train"] + patients["val"] + patients["test"]
    assert sorted(everyone) == [f"patient{i:03d}" for i in range(1, 7)]

    mapping = acdc_frame_files(out)
    assert sorted(mapping) == sorted(name for ids in splits.values() for name in ids)
    depth = {}
    for name, path in mapping.items():
        number = int(re.fullmatch(r"patient\d{3}_frame(\d{2})\.h5", path.name).group(1))
        assert number == 1 if name.endswith("frame01") else 8 <= number <= 15
        image, label = read_h5_volume(path, label_values={0, 1, 2, 3})
        assert 5 <= image.shape[0] <= 7 and all(40 <= n <= 48 for n in image.shape[1:])
        assert (image.min(), image.max()) == SPECS["acdc"].intensity_range
        with h5py.File(path, "r") as h5:
            assert h5["scribble"].dtype == np.uint16 and h5["scribble"].shape == label.shape
        depth[name] = image.shape[0]
    for patient in everyone:
        assert depth[f"{patient}_frame01"] == depth[f"{patient}_frame02"]

    slices = [parse_slice_name(s) for s in read_list(out / "train_slices.list")]
    assert len(slices) == sum(depth[f] for f in splits["train"])
    frames_in_order = [f for i, (f, _) in enumerate(slices) if i == 0 or slices[i - 1][0] != f]
    assert frames_in_order == splits["train"]  # grouped by frame, in train.list order
    for frame in splits["train"]:
        numbers = [k for f, k in slices if f == frame]
        assert sorted(numbers) == list(range(1, depth[frame] + 1))
    assert any(
        [k for f, k in slices if f == frame] != sorted(k for f, k in slices if f == frame)
        for frame in splits["train"]
    ), "slices should be shuffled within frames like upstream"


def test_acdc_anatomy_and_difficulty(tmp_path):
    out = synth_acdc(tmp_path, seed=0, n_train_patients=2, n_val_patients=1, n_test_patients=1)
    mapping = acdc_frame_files(out)
    for patient in ("patient001", "patient002", "patient003", "patient004"):
        volumes = [read_h5_volume(mapping[f"{patient}_{f}"]) for f in ("frame01", "frame02")]
        (_, label_ed), (_, label_es) = volumes
        assert (label_es == 3).sum() < 0.85 * (label_ed == 3).sum()  # contracted LV at ES
        for image, label in volumes:
            assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
            with_heart = [bool(label[s].any()) for s in range(label.shape[0])]
            assert sum(with_heart) > len(with_heart) / 2 and not all(with_heart)
            for s in np.flatnonzero([(label[s] == 3).any() for s in range(label.shape[0])]):
                lv = label[s] == 3
                assert ndimage.label(lv)[1] == 1
                ring = ndimage.binary_dilation(lv) & ~lv
                assert (label[s][ring] == 2).all(), "myocardium must enclose the LV cavity"
            assert image[label == 3].mean() - image[label == 2].mean() > 0.25
            assert best_threshold_dice(image, label == 3) < 0.7


def test_acdc_deterministic(tmp_path):
    kwargs = {"n_train_patients": 2, "n_val_patients": 1, "n_test_patients": 1,
              "slices": (4, 5), "size_hw": (32, 36)}
    first = synth_acdc(tmp_path / "a", seed=2, **kwargs)
    second = synth_acdc(tmp_path / "b", seed=2, **kwargs)
    other = synth_acdc(tmp_path / "c", seed=3, **kwargs)
    for name in ("train.list", "val.list", "test.list", "train_slices.list"):
        assert (first / name).read_text() == (second / name).read_text()
    files_a, files_b = acdc_frame_files(first), acdc_frame_files(second)
    for name in files_a:
        a, b = read_h5_volume(files_a[name]), read_h5_volume(files_b[name])
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    other_image = read_h5_volume(acdc_frame_files(other)["patient001_frame01"])[0]
    assert other_image.tobytes() != read_h5_volume(files_a["patient001_frame01"])[0].tobytes()


def test_acdc_patient_variation_ranges():
    from agcl.data.synth._common import patient_variation
    assert patient_variation(np.random.default_rng(0), 0.0) == {
        "scale": 1.0, "contrast": 1.0, "noise": 1.0, "gamma": 1.0}
    factors = [patient_variation(np.random.default_rng(i), 1.0) for i in range(400)]
    bounds = {"scale": (np.exp(-0.35), np.exp(0.35)), "contrast": (np.exp(-0.8), 1.0),
              "noise": (1.0, np.exp(0.7)), "gamma": (np.exp(-0.5), np.exp(0.5))}
    for key, (low, high) in bounds.items():  # x0.70-1.42, x0.45-1, x1-2.01, x0.61-1.65
        values = [f[key] for f in factors]
        assert low <= min(values) < low + 0.05 * (high - low), key
        assert high - 0.05 * (high - low) < max(values) <= high, key
    with pytest.raises(ValueError, match="variability must be >= 0"):
        patient_variation(np.random.default_rng(0), -0.5)


def test_acdc_variability_varies_patients_and_keeps_the_anatomy(tmp_path):
    kwargs = {"n_train_patients": 8, "n_val_patients": 1, "n_test_patients": 1,
              "slices": (6, 6), "size_hw": (64, 64)}
    spread = {}
    for variability in (0.0, 1.7):
        out = synth_acdc(tmp_path / str(variability), seed=0, variability=variability, **kwargs)
        mapping = acdc_frame_files(out)
        lv_area, contrast = [], []
        for patient in range(1, 11):
            image, label = read_h5_volume(mapping[f"patient{patient:03d}_frame01"])
            lv_area.append((label == 3).sum())
            contrast.append(image[label == 3].mean() - image[label == 2].mean())
            for s in np.flatnonzero([(label[s] == 3).any() for s in range(label.shape[0])]):
                lv = label[s] == 3
                ring = ndimage.binary_dilation(lv) & ~lv
                assert (label[s][ring] == 2).all(), "myocardium must enclose the LV cavity"
        spread[variability] = (max(lv_area) / min(lv_area), np.ptp(contrast))
    # Patients differ far more in heart size and in blood-pool contrast than at variability 0.
    assert spread[1.7][0] > 1.5 * spread[0.0][0]
    assert spread[1.7][1] > 2 * spread[0.0][1]


def test_la_variability_varies_the_cases(tmp_path):
    kwargs = {"n_train": 7, "n_test": 1, "size_xy": (40, 40), "size_z": 24}
    spread = {}
    for variability in (0.0, 1.5):
        out = synth_la(tmp_path / str(variability), seed=0, variability=variability, **kwargs)
        cases = sorted(out.glob("*/*/mri_norm2.h5"))
        volume, contrast = [], []
        for path in cases:
            image, label = read_h5_volume(path)
            volume.append(label.sum())
            contrast.append((image[label == 1].mean() - image[label == 0].mean()) / image.std())
        spread[variability] = (max(volume) / min(volume), np.ptp(contrast))
    assert spread[1.5][0] > 1.3 * spread[0.0][0]  # atrium sizes differ more between cases
    assert spread[1.5][1] > 2 * spread[0.0][1]  # and so does its contrast to the background


# --- CRAG ---------------------------------------------------------------------------------------


def _crag_pairs(root, split, annotation_dir, n):
    prefix = "train" if split == "train" else "test"
    return [(root / "CRAG" / split / "Images" / f"{prefix}_{i}.png",
             root / "CRAG" / split / annotation_dir / f"{prefix}_{i}.png",
             root / "CRAG" / split / "Overlay" / f"{prefix}_{i}.png") for i in range(1, n + 1)]


def test_crag_v2_layout_reads_back(tmp_path):
    out = synth_crag(tmp_path, seed=0, n_train=4, n_test=2, size=(60, 80))
    assert out == tmp_path
    assert sorted(p.name for p in (out / "CRAG").iterdir()) == ["train", "valid"]
    pairs = _crag_pairs(out, "train", "Annotation", 4) + _crag_pairs(out, "valid", "Annotation", 2)
    assert len(list((out / "CRAG").rglob("*.png"))) == 3 * 6
    sizes = set()
    for image_path, annotation_path, overlay_path in pairs:
        rgb, instances = read_crag_pair(image_path, annotation_path)
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
        assert all(60 <= n <= 80 for n in instances.shape)
        ids = np.unique(instances)
        assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # contiguous 1..k
        assert len(ids) >= 2
        with Image.open(annotation_path) as ann:
            assert ann.mode in ("L", "I;16")
        with Image.open(overlay_path) as overlay:
            assert overlay.mode == "RGB" and overlay.size == (rgb.shape[1], rgb.shape[0])
        # Glands: pale lumen inside, darker epithelium rim, so the mean colour differs from stroma.
        assert rgb[instances > 0].mean() != pytest.approx(rgb[instances == 0].mean(), abs=1)
        sizes.add(instances.shape)
    assert len(sizes) >= 2


def test_crag_readme_layout(tmp_path):
    out = synth_crag(tmp_path, seed=0, n_train=2, n_test=2, size=(40, 48), layout="readme")
    assert sorted(p.name for p in (out / "CRAG").iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (out / "CRAG" / "test").iterdir()) == [
        "Annotations", "Images", "Overlay"]
    for image_path, annotation_path, _ in _crag_pairs(out, "test", "Annotations", 2):
        read_crag_pair(image_path, annotation_path)


def test_crag_zip_has_same_members(tmp_path):
    kwargs = {"seed": 4, "n_train": 3, "n_test": 1, "size": (40, 48)}
    folder = synth_crag(tmp_path / "folder", **kwargs)
    zip_path = synth_crag(tmp_path / "zipped", as_zip=True, **kwargs)
    assert zip_path == tmp_path / "zipped" / "CRAG.zip"
    assert not (tmp_path / "zipped" / "CRAG").exists()
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted(files)
        assert all(zf.read(name) == data for name, data in files.items())
    assert synth_crag(tmp_path / "again", as_zip=True, **kwargs).read_bytes() == \
        zip_path.read_bytes()


def test_crag_deterministic(tmp_path):
    kwargs = {"n_train": 2, "n_test": 1, "size": (40, 48)}
    paths = [_crag_pairs(synth_crag(tmp_path / d, seed=s, **kwargs), "train", "Annotation", 2)
             for d, s in (("a", 7), ("b", 7), ("c", 8))]
    for (img_a, ann_a, _), (img_b, ann_b, _) in zip(paths[0], paths[1]):
        a, b = read_crag_pair(img_a, ann_a), read_crag_pair(img_b, ann_b)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(read_crag_pair(*paths[0][0][:2])[0],
                              read_crag_pair(*paths[2][0][:2])[0])


def test_crag_stain_varies_between_images(tmp_path):
    """Each image has its own stain, so a few labeled images do not cover the set (the demo's
    headroom between 5 % and 100 % labels); without it the stroma colour of six images spread
    over about 6 levels."""
    out = synth_crag(tmp_path, seed=0, n_train=6, n_test=1, size=(80, 96))
    stroma_means = []
    for image_path, annotation_path, _ in _crag_pairs(out, "train", "Annotation", 6):
        rgb, instances = read_crag_pair(image_path, annotation_path)
        stroma_means.append(rgb[instances == 0].reshape(-1, 3).mean(axis=0))
    assert np.ptp(np.array(stroma_means), axis=0).max() > 10


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout must be one of"):
        synth_crag(tmp_path, layout="v1")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        synth_la(tmp_path, seed=-1)
    with pytest.raises(ValueError, match=r"size_hw must be \(min, max\)"):
        synth_acdc(tmp_path, size_hw=(96, 72))


def test_crag_variability_varies_gland_size_and_stain_contrast(tmp_path):
    spread = {}
    for variability in (0.0, 1.5):
        out = synth_crag(tmp_path / str(variability), seed=0, n_train=8, n_test=1, size=(80, 80),
                         variability=variability)
        gland_share, contrast = [], []
        for image_path, annotation_path, _ in _crag_pairs(out, "train", "Annotation", 8):
            rgb, instances = read_crag_pair(image_path, annotation_path)
            grey = rgb.astype(float).mean(axis=2)
            gland_share.append((instances > 0).mean())
            contrast.append(grey.std())
        spread[variability] = (np.ptp(gland_share), max(contrast) / min(contrast))
    assert spread[1.5][0] > 1.3 * spread[0.0][0]  # glands differ more in size between tiles
    assert spread[1.5][1] > 1.5 * spread[0.0][1]  # and so does how strongly the stain contrasts
