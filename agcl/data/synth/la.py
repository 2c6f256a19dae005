"""Synthetic LA in the upstream on-disk format (see agcl.data.synth)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from agcl.data.formats import LA_CASE_TEMPLATE
from agcl.data.synth import _common as shared


def _la_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        case = "".join(rng.choice(shared.ID_ALPHABET, 20))
        if case not in ids:
            ids.append(case)
    return ids


def _la_case(rng: np.random.Generator, shape: tuple[int, int, int],
             variation: dict[str, float]) -> tuple[np.ndarray, ...]:
    """One LGE-MRI-like volume: an atrium blob with vein-like appendages, plus distractors;
    `variation` (from shared.patient_variation) scales atrium size, contrast, noise and gamma."""
    size = np.array(shape, dtype=float)
    points = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    center = size / 2 + rng.uniform(-0.06, 0.06, 3) * size
    semi_axes = (np.array([0.29, 0.26, 0.27]) * size * rng.uniform(0.92, 1.08, 3)
                 * min(variation["scale"], 1.2))  # larger atria would leave the volume
    angle = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    local = (points - center) @ rotation
    radius = np.linalg.norm(local / semi_axes, axis=-1)
    label = radius - 1 + 0.2 * shared.smooth_noise(rng, shape, 4.0) < 0
    for _ in range(rng.integers(2, 5)):
        direction = rng.normal(size=3) * [1.0, 1.0, 0.5]
        direction = direction / np.linalg.norm(direction) * semi_axes
        start = center + rotation @ (0.6 * direction)
        end = center + rotation @ (rng.uniform(1.3, 1.6) * direction)
        tube_radius = rng.uniform(0.055, 0.075) * size[:2].min()
        label |= shared.capsule(shape, start, end, tube_radius)

    # Distractors: the same brightness as the atrium, but tube- or lens-shaped and blotchy
    # instead of striped, kept apart from it so shape and texture, not intensity, separate them.
    keep_out = ndimage.binary_dilation(label, iterations=3)
    distractors = np.zeros(shape, dtype=bool)
    for kind in ["tube", "tube", "lens", "lens", "lens"]:
        for _attempt in range(20):
            spot = rng.uniform(0.1, 0.9, 3) * size
            if kind == "tube":  # vessel-like, crossing the whole volume along z
                end = spot + np.array([rng.uniform(-0.2, 0.2) * size[0], 0, 0])
                spot[2], end[2] = -2.0, size[2] + 2
                mask = shared.capsule(shape, spot, end, rng.uniform(0.06, 0.09) * size[0])
            else:  # flat lens
                axes = rng.uniform([0.10, 0.10, 0.04], [0.17, 0.17, 0.07]) * size[[0, 1, 0]]
                grid = np.ogrid[tuple(slice(0, n) for n in shape)]
                mask = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, spot, axes)) < 1
            if mask.any() and not (mask & keep_out).any():
                distractors |= mask
                break

    # Background level 0.2, structures near 1.0: the striped texture of the atrium and the
    # blotchy texture of the distractors both span the same intensity range.
    period = rng.uniform(3.0, 4.0)
    wave = rng.normal(size=3)
    stripes = np.sin(points @ (2 * np.pi * wave / np.linalg.norm(wave) / period))
    signal = 0.2 + 0.25 * shared.smooth_noise(rng, shape, 3.0)
    signal = np.where(label, 1.0 + 0.4 * stripes, signal)
    blotches = rng.uniform(0.9, 1.1) + 0.3 * shared.smooth_noise(rng, shape, 1.5)
    signal = np.where(distractors, blotches, signal)
    if variation["contrast"] != 1.0:  # towards the background level (0.2)
        signal = 0.2 + (signal - 0.2) * variation["contrast"]
    if variation["gamma"] != 1.0:
        signal = np.clip(signal, 0.0, None) ** variation["gamma"]
    signal = ndimage.gaussian_filter(signal, 0.6)  # partial-volume edges
    image = signal * shared.bias_field(rng, shape, 0.5) + rng.normal(0.0, 0.3 * variation["noise"], shape)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def synth_la(
    out: str | os.PathLike,
    seed: int = 0,
    n_train: int = 16,
    n_test: int = 4,
    size_xy: tuple[int, int] = (56, 72),
    size_z: int = 40,
    variability: float = 0.0,
) -> Path:
    """Write an LA-format dataset folder (train.list, test.list, h5 cases); return its path.

    variability: how much atrium size, contrast, noise and intensity curve vary between cases
    (0: one acquisition for all, byte-identical to earlier versions; see shared.patient_variation).
    """
    out = Path(out)
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if size_z < 8:
        raise ValueError(f"size_z must be >= 8, got {size_z}")
    ids = _la_ids(shared.rng(seed, shared.LA, shared.SPLIT), n_train + n_test)
    for index, case in enumerate(ids):
        rng = shared.rng(seed, shared.LA, index)
        shape = (shared.draw_side(rng, size_xy, "size_xy"), shared.draw_side(rng, size_xy, "size_xy"), size_z)
        variation = shared.patient_variation(shared.rng(seed, shared.LA, index, shared.VARIATION), variability)
        image, label = _la_case(rng, shape, variation)
        shared.write_h5(out / LA_CASE_TEMPLATE.format(case=case), image=image, label=label)
    shared.write_list(out / "train.list", ids[:n_train])
    shared.write_list(out / "test.list", ids[n_train:])
    return out
