"""Synthetic ACDC in the upstream on-disk format (see agcl.data.synth)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from agcl.data.formats import ACDC_VOLUME_DIR
from agcl.data.synth import _common as shared


def _acdc_patient(
    rng: np.random.Generator, n_slices: int, shape_hw: tuple[int, int],
    variation: dict[str, float],
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """ED and ES volumes (S,H,W) of one patient: image in [0,1] and label 0 bg/1 RV/2 Myo/3 LV;
    `variation` from shared.patient_variation."""
    height, width = shape_hw
    rows, cols = np.meshgrid(np.arange(height, dtype=float), np.arange(width, dtype=float),
                             indexing="ij")
    side = min(height, width)
    center = np.array([height, width]) / 2 + rng.uniform(-0.07, 0.07, 2) * side
    rho = np.hypot(rows - center[0], cols - center[1])
    theta = np.arctan2(rows - center[0], cols - center[1])
    # Irregular outline shared by both frames: a few low harmonics of the radius.
    wobble = 1 + sum(rng.uniform(-0.05, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                     for k in (2, 3))
    r_epi = rng.uniform(0.17, 0.2) * side * variation["scale"]
    wall = rng.uniform(0.28, 0.34) * r_epi
    rv_angle = rng.uniform(0.75, 1.25) * np.pi  # RV sits on one side of the LV
    rv_dir = np.array([np.sin(rv_angle), np.cos(rv_angle)])
    # The heart spans slice positions [base, apex]; slices outside it are empty.
    base = rng.uniform(-0.6, 0.4)
    apex = n_slices - 1 - rng.uniform(0.2, 0.9)
    papillary = [(rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.7)) for _ in range(2)]

    # Background: body ellipse of soft tissue with bright and dark blobs (other chambers, vessels,
    # fat, lung) of the same brightness as the blood pools; these pass through all slices.
    body = np.hypot((rows - height / 2) / (0.47 * height), (cols - width / 2) / (0.47 * width)) < 1
    heart_zone = rho < 1.9 * r_epi
    blobs = []
    for level in (0.85, 0.8, 0.75, 0.1):
        for _attempt in range(30):
            spot = rng.uniform(0.12, 0.88, 2) * [height, width]
            axes = rng.uniform(0.08, 0.15, 2) * side
            mask = np.hypot((rows - spot[0]) / axes[0], (cols - spot[1]) / axes[1]) < 1
            if not (mask & heart_zone).any():
                blobs.append((mask, level))
                break
    tissue = 0.45 + 0.06 * shared.smooth_noise(rng, (n_slices, height, width), 2.0)

    frames = []
    for contraction in (1.0, rng.uniform(0.75, 0.85)):  # ED, then ES with a smaller LV cavity
        label = np.zeros((n_slices, height, width), dtype=np.uint8)
        signal = np.where(body, tissue, 0.03)
        for s in range(n_slices):
            for mask, level in blobs:
                signal[s][mask] = level
            t = (s - base) / (apex - base)
            if not 0 <= t <= 1:
                continue
            scale = np.sqrt(1 - t**2)  # the heart narrows towards the apex
            epi = r_epi * (0.35 + 0.65 * scale) * (1 - 0.08 * (1 - contraction))
            # The cavity closes before the wall does: the apical slice is a cap of myocardium.
            endo = max(0.0, (epi - wall) * contraction - (1 - scale) * wall)
            rv_scale = np.sqrt(max(0.0, 1 - (t / 0.85) ** 2)) * (0.6 + 0.4 * contraction)
            lv = rho < endo * wobble
            myo = (rho < epi * wobble) & ~lv
            rv_center = center + rv_dir * 0.9 * epi
            along = (rows - rv_center[0]) * rv_dir[0] + (cols - rv_center[1]) * rv_dir[1]
            across = -(rows - rv_center[0]) * rv_dir[1] + (cols - rv_center[1]) * rv_dir[0]
            rv = np.hypot(along / (0.85 * epi * max(rv_scale, 1e-6)), across / (1.35 * epi)) < 1
            rv &= ~(lv | myo) & (rv_scale > 0.2)
            label[s][rv], label[s][myo], label[s][lv] = 1, 2, 3
            signal[s][rv], signal[s][myo], signal[s][lv] = 0.78, 0.18, 0.85
            for angle, depth in papillary:  # dark muscles inside the cavity, labelled LV
                spot = center + depth * endo * np.array([np.sin(angle), np.cos(angle)])
                signal[s][lv & (np.hypot(rows - spot[0], cols - spot[1]) < 0.18 * endo + 0.5)] = 0.4
        if variation["contrast"] != 1.0:  # towards the tissue level (0.45)
            signal = 0.45 + (signal - 0.45) * variation["contrast"]
        signal = ndimage.gaussian_filter(signal, (0, 0.7, 0.7))
        image = signal * shared.bias_field(rng, signal.shape, 0.4)
        image = image + rng.normal(0.0, 0.07 * variation["noise"], image.shape)
        # Upstream: clip at the 99th percentile, then min-max to [0, 1].
        image = np.clip(image, None, np.percentile(image, 99))
        image = (image - image.min()) / (image.max() - image.min())
        if variation["gamma"] != 1.0:
            image = image ** variation["gamma"]
        frames.append((image.astype(np.float32), label))
    return frames[0], frames[1]


def synth_acdc(
    out: str | os.PathLike,
    seed: int = 0,
    n_train_patients: int = 10,
    n_val_patients: int = 2,
    n_test_patients: int = 4,
    slices: tuple[int, int] = (6, 10),
    size_hw: tuple[int, int] = (72, 96),
    variability: float = 0.0,
) -> Path:
    """Write an ACDC-format dataset folder (4 lists, h5 volumes); return its path.

    variability: how much heart size, contrast, noise and intensity curve vary between patients
    (0 = one acquisition for everyone; see shared.patient_variation).
    """
    out = Path(out)
    counts = (n_train_patients, n_val_patients, n_test_patients)
    if min(counts) < 1 or sum(counts) > 999:
        raise ValueError(f"patient counts must be >= 1 and sum to <= 999, got {counts}")
    if not 4 <= slices[0] <= slices[1]:
        raise ValueError(f"slices must be (min, max) with 4 <= min <= max, got {slices}")
    split_rng = shared.rng(seed, shared.ACDC, shared.SPLIT)
    patients = [f"patient{i:03d}" for i in split_rng.permutation(np.arange(1, sum(counts) + 1))]
    splits = {"train": patients[:counts[0]], "val": patients[counts[0]:counts[0] + counts[1]],
              "test": patients[counts[0] + counts[1]:]}

    n_slices: dict[str, int] = {}
    for patient in sorted(patients):
        rng = shared.rng(seed, shared.ACDC, int(patient[-3:]))
        depth = int(rng.integers(slices[0], slices[1] + 1))
        shape_hw = (shared.draw_side(rng, size_hw, "size_hw"), shared.draw_side(rng, size_hw, "size_hw"))
        es_number = int(rng.integers(8, 16))
        variation = shared.patient_variation(shared.rng(seed, shared.ACDC, int(patient[-3:]), shared.VARIATION),
                                       variability)
        for list_frame, number, (image, label) in zip(
            ("frame01", "frame02"), (1, es_number),
            _acdc_patient(rng, depth, shape_hw, variation),
        ):
            scribble = np.full(label.shape, shared.ACDC_UNANNOTATED_SCRIBBLE, dtype=np.uint16)
            path = out / ACDC_VOLUME_DIR / f"{patient}_frame{number:02d}.h5"
            shared.write_h5(path, image=image, label=label, scribble=scribble)
            n_slices[f"{patient}_{list_frame}"] = depth

    for split, members in splits.items():
        shared.write_list(out / f"{split}.list", [f"{p}_{f}" for p in members for f in ("frame01",
                                                                                  "frame02")])
    slice_names = []
    for patient in splits["train"]:
        for frame in (f"{patient}_frame01", f"{patient}_frame02"):
            order = split_rng.permutation(n_slices[frame]) + 1  # upstream shuffles within a frame
            slice_names += [f"{frame}_slice_{k}" for k in order]
    shared.write_list(out / "train_slices.list", slice_names)
    return out
