"""Seeded synthetic LA, ACDC and CRAG datasets in exactly the upstream on-disk formats.

They are small, so a CPU demo trains in seconds, and learnable but not by an intensity threshold:
the target shares its intensity range with distractors of another shape or texture, under a bias
field and noise. The same seed gives byte-identical arrays (and files). Size arguments are
(min, max) ranges, inclusive, drawn per case for every spatial side.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from scipy import ndimage

from agcl.data.formats import ACDC_VOLUME_DIR, LA_CASE_TEMPLATE
from agcl.utils import atomic_path, write_text

# Salts keep the random streams of the three datasets (and of their splits) independent.
_LA, _ACDC, _CRAG, _SPLIT, _VARIATION = 1, 2, 3, 99, 7
_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
_ACDC_UNANNOTATED_SCRIBBLE = 4  # WSL4MIS marks pixels without a scribble with 4


def _rng(seed: int, *keys: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), *keys])


def _draw_side(rng: np.random.Generator, bounds: tuple[int, int], name: str) -> int:
    lo, hi = bounds
    if not 8 <= lo <= hi:
        raise ValueError(f"{name} must be (min, max) with 8 <= min <= max, got {bounds}")
    return int(rng.integers(lo, hi + 1))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ~sigma."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / field.std()


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * quadratic polynomial) over [-1, 1] coordinates."""
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    poly = sum(rng.uniform(-1, 1) * a + 0.5 * rng.uniform(-1, 1) * a * a for a in axes)
    return np.exp(strength * poly / len(shape))


def _capsule(shape: tuple[int, ...], start: np.ndarray, end: np.ndarray, radius: float) -> np.ndarray:
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


def _write_h5(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for key, array in arrays.items():
            h5.create_dataset(key, data=array, compression="gzip", compression_opts=4, chunks=True)


def _write_list(path: Path, ids: list[str]) -> None:
    write_text(path, "".join(f"{i}\n" for i in ids))


# --- LA -----------------------------------------------------------------------------------------


def _patient_variation(rng: np.random.Generator, variability: float) -> dict[str, float]:
    """Per-case factors of organ size, tissue contrast, noise and intensity curve (gamma).

    At variability 0 every factor is exactly 1 (the stream is separate, so the rest of a patient
    is the same for every variability); at 1 they span x0.7-1.4, x0.45-1, x1-2 and x0.6-1.65.
    """
    if variability < 0:
        raise ValueError(f"variability must be >= 0, got {variability}")
    draws = rng.uniform([-0.35, -0.8, 0.0, -0.5], [0.35, 0.0, 0.7, 0.5])
    return dict(zip(("scale", "contrast", "noise", "gamma"), np.exp(variability * draws)))


def _la_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        case = "".join(rng.choice(_ID_ALPHABET, 20))
        if case not in ids:
            ids.append(case)
    return ids


def _la_case(rng: np.random.Generator, shape: tuple[int, int, int],
             variation: dict[str, float]) -> tuple[np.ndarray, ...]:
    """One LGE-MRI-like volume: an atrium blob with vein-like appendages, plus distractors;
    `variation` (from _patient_variation) scales atrium size, contrast, noise and gamma."""
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
    label = radius - 1 + 0.2 * _smooth_noise(rng, shape, 4.0) < 0
    for _ in range(rng.integers(2, 5)):
        direction = rng.normal(size=3) * [1.0, 1.0, 0.5]
        direction = direction / np.linalg.norm(direction) * semi_axes
        start = center + rotation @ (0.6 * direction)
        end = center + rotation @ (rng.uniform(1.3, 1.6) * direction)
        tube_radius = rng.uniform(0.055, 0.075) * size[:2].min()
        label |= _capsule(shape, start, end, tube_radius)

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
                mask = _capsule(shape, spot, end, rng.uniform(0.06, 0.09) * size[0])
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
    signal = 0.2 + 0.25 * _smooth_noise(rng, shape, 3.0)
    signal = np.where(label, 1.0 + 0.4 * stripes, signal)
    blotches = rng.uniform(0.9, 1.1) + 0.3 * _smooth_noise(rng, shape, 1.5)
    signal = np.where(distractors, blotches, signal)
    if variation["contrast"] != 1.0:  # towards the background level (0.2)
        signal = 0.2 + (signal - 0.2) * variation["contrast"]
    if variation["gamma"] != 1.0:
        signal = np.clip(signal, 0.0, None) ** variation["gamma"]
    signal = ndimage.gaussian_filter(signal, 0.6)  # partial-volume edges
    image = signal * _bias_field(rng, shape, 0.5) + rng.normal(0.0, 0.3 * variation["noise"], shape)
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
    (0: one acquisition for all, byte-identical to earlier versions; see _patient_variation).
    """
    out = Path(out)
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if size_z < 8:
        raise ValueError(f"size_z must be >= 8, got {size_z}")
    ids = _la_ids(_rng(seed, _LA, _SPLIT), n_train + n_test)
    for index, case in enumerate(ids):
        rng = _rng(seed, _LA, index)
        shape = (_draw_side(rng, size_xy, "size_xy"), _draw_side(rng, size_xy, "size_xy"), size_z)
        variation = _patient_variation(_rng(seed, _LA, index, _VARIATION), variability)
        image, label = _la_case(rng, shape, variation)
        _write_h5(out / LA_CASE_TEMPLATE.format(case=case), image=image, label=label)
    _write_list(out / "train.list", ids[:n_train])
    _write_list(out / "test.list", ids[n_train:])
    return out


# --- ACDC ---------------------------------------------------------------------------------------


def _acdc_patient(
    rng: np.random.Generator, n_slices: int, shape_hw: tuple[int, int],
    variation: dict[str, float],
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """ED and ES volumes (S,H,W) of one patient: image in [0,1] and label 0 bg/1 RV/2 Myo/3 LV;
    `variation` from _patient_variation."""
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
    tissue = 0.45 + 0.06 * _smooth_noise(rng, (n_slices, height, width), 2.0)

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
        image = signal * _bias_field(rng, signal.shape, 0.4)
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
    (0 = one acquisition for everyone; see _patient_variation).
    """
    out = Path(out)
    counts = (n_train_patients, n_val_patients, n_test_patients)
    if min(counts) < 1 or sum(counts) > 999:
        raise ValueError(f"patient counts must be >= 1 and sum to <= 999, got {counts}")
    if not 4 <= slices[0] <= slices[1]:
        raise ValueError(f"slices must be (min, max) with 4 <= min <= max, got {slices}")
    split_rng = _rng(seed, _ACDC, _SPLIT)
    patients = [f"patient{i:03d}" for i in split_rng.permutation(np.arange(1, sum(counts) + 1))]
    splits = {"train": patients[:counts[0]], "val": patients[counts[0]:counts[0] + counts[1]],
              "test": patients[counts[0] + counts[1]:]}

    n_slices: dict[str, int] = {}
    for patient in sorted(patients):
        rng = _rng(seed, _ACDC, int(patient[-3:]))
        depth = int(rng.integers(slices[0], slices[1] + 1))
        shape_hw = (_draw_side(rng, size_hw, "size_hw"), _draw_side(rng, size_hw, "size_hw"))
        es_number = int(rng.integers(8, 16))
        variation = _patient_variation(_rng(seed, _ACDC, int(patient[-3:]), _VARIATION),
                                       variability)
        for list_frame, number, (image, label) in zip(
            ("frame01", "frame02"), (1, es_number),
            _acdc_patient(rng, depth, shape_hw, variation),
        ):
            scribble = np.full(label.shape, _ACDC_UNANNOTATED_SCRIBBLE, dtype=np.uint16)
            path = out / ACDC_VOLUME_DIR / f"{patient}_frame{number:02d}.h5"
            _write_h5(path, image=image, label=label, scribble=scribble)
            n_slices[f"{patient}_{list_frame}"] = depth

    for split, members in splits.items():
        _write_list(out / f"{split}.list", [f"{p}_{f}" for p in members for f in ("frame01",
                                                                                  "frame02")])
    slice_names = []
    for patient in splits["train"]:
        for frame in (f"{patient}_frame01", f"{patient}_frame02"):
            order = split_rng.permutation(n_slices[frame]) + 1  # upstream shuffles within a frame
            slice_names += [f"{frame}_slice_{k}" for k in order]
    _write_list(out / "train_slices.list", slice_names)
    return out


# --- CRAG ---------------------------------------------------------------------------------------

_STROMA = np.array([236, 170, 205], dtype=float)
_EPITHELIUM = np.array([196, 120, 186], dtype=float)
_LUMEN = np.array([246, 236, 246], dtype=float)
_NUCLEUS = np.array([92, 52, 140], dtype=float)


def _crag_image(rng: np.random.Generator, shape: tuple[int, int],
                variation: dict[str, float]) -> tuple[np.ndarray, ...]:
    """An H&E-like tile: pink stroma with nuclei, glands of epithelium around a pale lumen;
    `variation` (from _patient_variation) scales gland size, stain contrast, noise and gamma."""
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
    texture = _smooth_noise(rng, shape, 2.0)[..., None]
    rgb = _STROMA + 10 * texture
    lumen = (instances > 0) & ~epithelium
    pale_stroma = (_smooth_noise(rng, shape, 4.0) > 1.8) & (instances == 0)
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
    (0: byte-identical to earlier versions; see _patient_variation).
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
        rng = _rng(seed, _CRAG, index)
        shape = (_draw_side(rng, size, "size"), _draw_side(rng, size, "size"))
        if index == n_train + n_test - 1 and len(set(shapes)) == 1 and shape in shapes:
            shape = (size[0], size[1]) if shape != (size[0], size[1]) else (size[1], size[0])
        shapes.append(shape)
        variation = _patient_variation(_rng(seed, _CRAG, index, _VARIATION), variability)
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


SYNTHESIZERS = {"la": synth_la, "acdc": synth_acdc, "crag": synth_crag}
