"""Readers for the upstream on-disk formats (LA, ACDC, CRAG), shared by real and synthetic data.

Every reader checks what it reads and raises FormatError naming the file, the field and what was
expected, so a bad download fails here and not deep inside training.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

LA_CASE_TEMPLATE = "2018LA_Seg_Training Set/{case}/mri_norm2.h5"
ACDC_VOLUME_DIR = "ACDC_training_volumes"

_ACDC_FILE = re.compile(r"^(patient\d{3})_frame(\d{2})\.h5$")
_SLICE_NAME = re.compile(r"^(patient\d{3}_frame\d{2})_slice_(\d+)$")
_SINGLE_CHANNEL_MODES = {"L", "P", "I", "I;16", "I;16B", "I;16L"}


class FormatError(ValueError):
    """A dataset file exists but does not hold what the upstream format promises."""


def natural_key(name: str) -> list:
    """Sort key that puts train_2 before train_10 (digit runs compare as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_list(path: str | os.PathLike) -> list[str]:
    """Read a split list: one id a line, whitespace stripped, blank lines skipped."""
    path = Path(path)
    ids = [line.strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise FormatError(f"{path}: list is empty (expected one id a line)")
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise FormatError(f"{path}: duplicate ids {duplicates} (expected each id once)")
    return ids


def check_finite(array: np.ndarray, where: str) -> np.ndarray:
    """Raise FormatError naming `where` when a float array holds NaN or Inf; return the array."""
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = np.argwhere(~finite)
            first = tuple(int(i) for i in bad[0])
            raise FormatError(f"{where} holds {len(bad)} non-finite value(s) (NaN or Inf; the first "
                              f"at index {first}, value {array[first]}): expected finite "
                              "intensities; re-create or re-download this file")
    return array


def la_case_path(dataset_dir: str | os.PathLike, case: str) -> Path:
    return Path(dataset_dir) / LA_CASE_TEMPLATE.format(case=case)


def read_h5_volume(
    path: str | os.PathLike, label_values: set[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32, label uint8) of an LA or ACDC h5 file, after checking both keys.

    `label_values`, when given, is the set the labels present must fall in (e.g. {0, 1} for LA).
    """
    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise FormatError(f"{path}: cannot open as HDF5 ({err})") from err
    with h5:
        for key in ("image", "label"):
            if key not in h5:
                raise FormatError(
                    f"{path}: missing key '{key}' (expected keys 'image' and 'label', "
                    f"found {sorted(h5.keys())})"
                )
            if not isinstance(h5[key], h5py.Dataset):
                raise FormatError(f"{path}: key '{key}' is a group (expected a dataset)")
        image_ds, label_ds = h5["image"], h5["label"]
        if image_ds.ndim != 3:
            raise FormatError(
                f"{path}: key 'image' has {image_ds.ndim} dimensions {image_ds.shape} "
                "(expected a 3D volume)"
            )
        if label_ds.shape != image_ds.shape:
            raise FormatError(
                f"{path}: key 'label' has shape {label_ds.shape} "
                f"(expected the shape of 'image', {image_ds.shape})"
            )
        if not np.issubdtype(image_ds.dtype, np.floating):
            raise FormatError(f"{path}: key 'image' has dtype {image_ds.dtype} (expected float)")
        if not np.issubdtype(label_ds.dtype, np.integer):
            raise FormatError(f"{path}: key 'label' has dtype {label_ds.dtype} (expected integer)")
        image = check_finite(image_ds[()].astype(np.float32, copy=False), f"{path}: key 'image'")
        label = label_ds[()]
    present = {int(v) for v in np.unique(label)}
    allowed = set(range(256)) if label_values is None else set(label_values)
    unexpected = sorted(present - allowed)
    if unexpected:
        raise FormatError(
            f"{path}: key 'label' holds values {unexpected} "
            f"(expected a subset of {sorted(allowed) if label_values is not None else '0..255'})"
        )
    return image, label.astype(np.uint8, copy=False)


def acdc_frame_files(dataset_dir: str | os.PathLike) -> dict[str, Path]:
    """Map list names 'patientXXX_frame01/02' to the files holding the original frame numbers.

    frame01 is the lower original frame number of a patient, frame02 the higher. Only patients
    present on disk appear, so a restricted download still works.
    """
    volume_dir = Path(dataset_dir) / ACDC_VOLUME_DIR
    if not volume_dir.is_dir():
        raise FormatError(f"{volume_dir}: folder missing (expected the ACDC h5 volumes in it)")
    frames: dict[str, list[tuple[int, Path]]] = {}
    for file in volume_dir.iterdir():
        match = _ACDC_FILE.match(file.name)
        if match:
            frames.setdefault(match.group(1), []).append((int(match.group(2)), file))
    if not frames:
        raise FormatError(
            f"{volume_dir}: no file named patientXXX_frameNN.h5 (expected the ACDC volumes)"
        )
    mapping: dict[str, Path] = {}
    for patient in sorted(frames):
        found = sorted(frames[patient])
        if len(found) != 2:
            names = [f.name for _, f in found]
            raise FormatError(
                f"{volume_dir}: {patient} has {len(found)} frame files {names} "
                "(expected exactly two, ED and ES)"
            )
        mapping[f"{patient}_frame01"] = found[0][1]
        mapping[f"{patient}_frame02"] = found[1][1]
    return mapping


def parse_slice_name(name: str) -> tuple[str, int]:
    """'patient099_frame01_slice_15' -> ('patient099_frame01', 15); slice numbers are 1-based."""
    match = _SLICE_NAME.match(name)
    if not match or int(match.group(2)) < 1:
        raise FormatError(
            f"slice name {name!r} is malformed (expected 'patientXXX_frameNN_slice_K', K >= 1)"
        )
    return match.group(1), int(match.group(2))


def read_crag_pair(
    image_path: str | os.PathLike, instance_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Return (RGB uint8 (H,W,3), instance map int32 (H,W)) of one CRAG image and annotation."""
    image_path, instance_path = Path(image_path), Path(instance_path)
    with _open_image(image_path) as img:
        if img.mode not in ("RGB", "RGBA"):
            raise FormatError(f"{image_path}: image mode {img.mode} (expected RGB)")
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    with _open_image(instance_path) as ann:
        if ann.mode not in _SINGLE_CHANNEL_MODES:
            raise FormatError(
                f"{instance_path}: annotation mode {ann.mode} "
                "(expected a single-channel instance map: L, P or I;16)"
            )
        instances = np.asarray(ann).astype(np.int32)
    if instances.min() < 0:
        raise FormatError(f"{instance_path}: negative instance ids (expected 0 = bg, ids > 0)")
    if rgb.shape[:2] != instances.shape:
        raise FormatError(
            f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]} but {instance_path} is "
            f"{instances.shape[1]}x{instances.shape[0]} (expected the same size, W x H)"
        )
    return rgb, instances


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except OSError as err:
        raise FormatError(f"{path}: cannot open as an image ({err})") from err
