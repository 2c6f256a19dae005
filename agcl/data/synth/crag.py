"""Synthetic CRAG in the upstream on-disk format (see agcl.data.synth)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from agcl.common.utils import atomic_path
from agcl.data.synth import _common as shared

_STROMA = np.array([236, 170, 205], dtype=float)
_EPITHELIUM = np.array([196, 120, 186], dtype=float)
_LUMEN = np.array([246, 236, 246], dtype=float)
_NUCLEUS = np.array([92, 52, 140], dtype=float)


def _crag_image(rng: np.random.Generator, shape: tuple[int, int],
                variation: dict[str, float]) -> tuple[np.ndarray, ...]:
    """An H&E-like tile: pink stroma with nuclei, glands of epithelium around a pale lumen;
    `variation` (from shared.patient_variation) scales gland size, stain contrast, noise and gamma."""
    height, width = shape
    rows, cols = np.meshgrid(np.arange(height, dtype=float), np.arange(width, dtype=float),
                             indexing="ij")
    instances = np.zeros(shape, dtype=np.int32)
    epithelium = np.zeros(shape, dtype=bool)
    side = min(shape)
    placed: list[tuple[np.ndarray, float]] = []
    n_glands = rng.integers(3, 8)
    for _attempt in range(40):
        if len(placed) == n_glands:
            break
        radius = rng.uniform(0.1, 0.2) * side * variation["scale"]
        center = rng.uniform(0, 1, 2) * [height, width]
        if any(np.linalg.norm(center - c) < radius + r + 4 for c, r in placed):
            continue
        theta = np.arctan2(rows - center[0], cols - center[1])
        stretch = rng.uniform(0.65, 1.0)
        angle = rng.uniform(0, np.pi)
        u = (rows - center[0]) * np.cos(angle) + (cols - center[1]) * np.sin(angle)
        v = -(rows - center[0]) * np.sin(angle) + (cols - center[1]) * np.cos(angle)
        wobble = 1 + sum(rng.uniform(-0.08, 0.08) * np.cos(k * theta + rng.uniform(0, 6.3))
                         for k in (2, 3, 5))
        dist = np.hypot(u, v / stretch) / (radius * wobble)
        gland = (dist < 1) & (instances == 0)
        if gland.sum() < 20:  # mostly outside the tile
            continue
        placed.append((center, radius))
        instances[gland] = len(placed)
        epithelium |= gland & (dist > rng.uniform(0.45, 0.65))

    # Solid nests of epithelium-coloured cells in the stroma (no lumen, not glands): a gland is
    # told by its rim around a lumen, not by its colour.
    nests = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(2, 6)):
        center = rng.uniform(0, 1, 2) * [height, width]
        axes = rng.uniform(0.04, 0.09, 2) * side
        nest = np.hypot((rows - center[0]) / axes[0], (cols - center[1]) / axes[1]) < 1
        nests |= nest & ~ndimage.binary_dilation(instances > 0, iterations=2)

    # Pale spaces in the stroma and nuclei everywhere keep colour alone from finding glands.
    texture = shared.smooth_noise(rng, shape, 2.0)[..., None]
    rgb = _STROMA + 10 * texture
    lumen = (instances > 0) & ~epithelium
    pale_stroma = (shared.smooth_noise(rng, shape, 4.0) > 1.8) & (instances == 0)
    rgb[lumen | pale_stroma] = _LUMEN
    cellular = epithelium | nests
    rgb[cellular] = _EPITHELIUM + 8 * texture[cellular]
    seeds = rng.uniform(size=shape) < np.where(cellular, 0.08, 0.012)
    nuclei = ndimage.binary_dilation(seeds, iterations=1) & ~lumen
    rgb[nuclei] = _NUCLEUS
    # Stain varies between slides: a per-image scale and shift of each colour channel.
    rgb = rgb * rng.uniform(0.85, 1.15, 3) + rng.uniform(-15, 15, 3)
    if variation["contrast"] != 1.0:  # a faint stain: every colour towards the stroma's
        rgb = _STROMA + (rgb - _STROMA) * variation["contrast"]
    if variation["gamma"] != 1.0:
        rgb = 255 * (np.clip(rgb, 0, 255) / 255) ** variation["gamma"]
    rgb = ndimage.gaussian_filter(rgb, (0.6, 0.6, 0)) + rng.normal(0, 6 * variation["noise"],
                                                                   rgb.shape)
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    overlay = rgb.copy()
    boundary = (instances > 0) & (ndimage.grey_erosion(instances, size=3) != instances)
    overlay[boundary] = (0, 200, 0)
    return rgb, instances, overlay


def _png_bytes(array: np.ndarray) -> bytes:
    if array.ndim == 3:
        image = Image.fromarray(array, "RGB")
    elif array.max() <= 255:
        image = Image.fromarray(array.astype(np.uint8), "L")
    else:
        image = Image.fromarray(array.astype(np.uint16), "I;16")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synth_crag(
    out: str | os.PathLike,
    seed: int = 0,
    n_train: int = 12,
    n_test: int = 4,
    size: tuple[int, int] = (96, 128),
    layout: str = "v2",
    as_zip: bool = False,
    variability: float = 0.0,
) -> Path:
    """Write CRAG/ as the user's zip unpacks (or out/CRAG.zip); return out or the zip path.

    layout "v2": CRAG/{train,valid}/{Images,Annotation,Overlay}; "readme": test/ and Annotations/.
    variability: how much gland size, stain contrast, noise and colour curve vary between tiles
    (0: byte-identical to earlier versions; see shared.patient_variation).
    """
    layouts = {"v2": ("valid", "Annotation"), "readme": ("test", "Annotations")}
    if layout not in layouts:
        raise ValueError(f"layout must be one of {sorted(layouts)}, got {layout!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    test_dir, annotation_dir = layouts[layout]
    out = Path(out)

    members: dict[str, bytes] = {}
    shapes = []
    for index in range(n_train + n_test):
        rng = shared.rng(seed, shared.CRAG, index)
        shape = (shared.draw_side(rng, size, "size"), shared.draw_side(rng, size, "size"))
        if index == n_train + n_test - 1 and len(set(shapes)) == 1 and shape in shapes:
            shape = (size[0], size[1]) if shape != (size[0], size[1]) else (size[1], size[0])
        shapes.append(shape)
        variation = shared.patient_variation(shared.rng(seed, shared.CRAG, index, shared.VARIATION), variability)
        rgb, instances, overlay = _crag_image(rng, shape, variation)
        split, name = ("train", f"train_{index + 1}") if index < n_train else (
            test_dir, f"test_{index - n_train + 1}")
        for folder, array in (("Images", rgb), (annotation_dir, instances), ("Overlay", overlay)):
            members[f"CRAG/{split}/{folder}/{name}.png"] = _png_bytes(array)

    if as_zip:
        zip_path = out / "CRAG.zip"
        with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                # A fixed timestamp keeps the zip byte-identical for the same seed.
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data,
                            compress_type=zipfile.ZIP_DEFLATED)
        return zip_path
    for name, data in members.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    return out
