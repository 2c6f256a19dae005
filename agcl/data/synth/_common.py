"""What the synthetic datasets share: seeded streams, smooth noise, shapes and file writers."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from agcl.common.utils import atomic_path, write_text

# Salts keep the random streams of the three datasets (and of their splits) independent.
LA, ACDC, CRAG, SPLIT, VARIATION = 1, 2, 3, 99, 7
ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
ACDC_UNANNOTATED_SCRIBBLE = 4  # WSL4MIS marks pixels without a scribble with 4


def rng(seed: int, *keys: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), *keys])


def draw_side(rng: np.random.Generator, bounds: tuple[int, int], name: str) -> int:
    lo, hi = bounds
    if not 8 <= lo <= hi:
        raise ValueError(f"{name} must be (min, max) with 8 <= min <= max, got {bounds}")
    return int(rng.integers(lo, hi + 1))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ~sigma."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / field.std()


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * quadratic polynomial) over [-1, 1] coordinates."""
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    poly = sum(rng.uniform(-1, 1) * a + 0.5 * rng.uniform(-1, 1) * a * a for a in axes)
    return np.exp(strength * poly / len(shape))


def capsule(shape: tuple[int, ...], start: np.ndarray, end: np.ndarray, radius: float) -> np.ndarray:
    """Mask of the points within `radius` of the segment start-end (computed in its bounding box)."""
    mask = np.zeros(shape, dtype=bool)
    lo = np.maximum(np.floor(np.minimum(start, end) - radius), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(start, end) + radius) + 1, shape).astype(int)
    if (hi <= lo).any():
        return mask
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    points = np.stack(np.meshgrid(*[np.arange(a, b, dtype=float) for a, b in zip(lo, hi)],
                                  indexing="ij"), -1)
    direction = end - start
    t = np.clip(((points - start) @ direction) / (direction @ direction), 0.0, 1.0)
    mask[box] = np.linalg.norm(points - start - t[..., None] * direction, axis=-1) < radius
    return mask


def write_h5(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for key, array in arrays.items():
            h5.create_dataset(key, data=array, compression="gzip", compression_opts=4, chunks=True)


def write_list(path: Path, ids: list[str]) -> None:
    write_text(path, "".join(f"{i}\n" for i in ids))


def patient_variation(rng: np.random.Generator, variability: float) -> dict[str, float]:
    """Per-case factors of organ size, tissue contrast, noise and intensity curve (gamma).

    At variability 0 every factor is exactly 1 (the stream is separate, so the rest of a patient
    is the same for every variability); at 1 they span x0.7-1.4, x0.45-1, x1-2 and x0.6-1.65.
    """
    if variability < 0:
        raise ValueError(f"variability must be >= 0, got {variability}")
    draws = rng.uniform([-0.35, -0.8, 0.0, -0.5], [0.35, 0.0, 0.7, 0.5])
    return dict(zip(("scale", "contrast", "noise", "gamma"), np.exp(variability * draws)))
