"""Pixel/voxel overlap and surface-distance metrics, equal to medpy 0.5.2 and much faster.

`binary_metrics` returns the four numbers the upstream papers report (medpy `dc`, `jc`, `hd95`,
`asd`) plus the raw voxel counts, so any other overlap metric can be recomputed later.

Why it is faster than medpy: medpy runs a Euclidean distance transform over the whole volume once
per direction. Here both masks are cropped to the bounding box of their union, the one-voxel
surfaces are taken once, and the distances come from nearest-neighbour queries between the two
surface point sets (a k-d tree), which is exact for Euclidean distances.

Why the crop changes nothing: medpy's surface is `mask XOR binary_erosion(mask, cross)` with
scipy's default border value 0, i.e. voxels on the ARRAY edge count as surface. After cropping to
the union bounding box, every voxel just outside the crop is background in both masks (it is
outside the union) or outside the array (border value 0 again), so erosion inside the crop, and
hence the surface, is identical without any margin.

Conventions fixed by medpy 0.5.2 (checked against it in tests/test_metrics.py):
- hd95 is ONE 95th percentile (numpy's default linear interpolation) of the pooled distances
  pred->gt concatenated with gt->pred, not the larger of two one-way percentiles.
- asd(pred, gt) is one-way: the mean distance from each pred surface voxel to the gt surface.
- Distances are in voxels unless `spacing` is given (the upstream LA/ACDC numbers use voxels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.spatial import cKDTree

EMPTY_POLICIES = ("metrics_reloaded", "reference")

# Values used when a policy kicks in: (dice, jaccard, hd95, asd).
_BOTH_EMPTY = {
    "metrics_reloaded": (1.0, 1.0, 0.0, 0.0),
    "reference": (0.0, 0.0, 0.0, 0.0),
}
_ONE_EMPTY = {
    # Distances to a missing surface are undefined: nan here, a stated worst-case value is
    # substituted at aggregation time.
    "metrics_reloaded": (0.0, 0.0, math.nan, math.nan),
    "reference": (0.0, 0.0, 0.0, 0.0),
}


def _as_mask(array, name: str) -> np.ndarray:
    """Boolean view of a mask; refuses label maps so a class map is never silently binarised."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name}: expected a boolean or 0/1 numeric mask, got dtype {array.dtype}")
    values = np.unique(array)
    if not np.isin(values, (0, 1)).all():
        shown = values[:6].tolist()
        raise ValueError(
            f"{name}: expected a binary mask (values 0/1), found values {shown}"
            f"{'...' if values.size > 6 else ''}; compare a label map with a class first"
        )
    return array.astype(bool)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"pred/gt: expected a 2D or 3D mask, got {pred.ndim} dimensions")


def _check_spacing(spacing, ndim: int) -> np.ndarray | None:
    if spacing is None:
        return None
    values = np.asarray(spacing, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(ndim, float(values))
    if values.shape != (ndim,):
        raise ValueError(f"spacing: expected {ndim} values (one per axis), got {values.tolist()}")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"spacing: expected positive finite values, got {values.tolist()}")
    return values


def _union_crop(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of pred | gt as slices (the union is non-empty here)."""
    union = pred | gt
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)


def _surface_points(mask: np.ndarray, spacing: np.ndarray | None) -> np.ndarray:
    """Coordinates (scaled by spacing) of medpy's one-voxel border: mask XOR erosion(mask, cross).

    The erosion is written with array shifts (about 5x faster than scipy's binary_erosion here);
    padding with False reproduces scipy's border_value=0, so the array edge counts as surface.
    """
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for start in (0, 2):  # the neighbour before and after along this axis
            window = [slice(1, -1)] * mask.ndim
            window[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(window)]
    points = np.argwhere(mask & ~interior).astype(np.float64)
    if spacing is not None:
        points *= spacing
    return points


def _nearest_distances(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    # leafsize 32 and an unbalanced build measured ~15% faster than the defaults on LA surfaces.
    tree = cKDTree(targets, leafsize=32, balanced_tree=False, compact_nodes=False)
    distances, _ = tree.query(queries, k=1)
    return distances


def surface_distances(pred, gt, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Distances pred-surface -> gt-surface and gt-surface -> pred-surface (both masks non-empty).

    Same values as medpy's private `__surface_distances(pred, gt)` and `(gt, pred)`; the order of
    the entries may differ (irrelevant to percentiles and means).
    """
    pred = _as_mask(pred, "pred")
    gt = _as_mask(gt, "gt")
    _check_pair(pred, gt)
    spacing = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        raise ValueError("surface_distances needs two non-empty masks; use binary_metrics")
    crop = _union_crop(pred, gt)
    pred_points = _surface_points(pred[crop], spacing)
    gt_points = _surface_points(gt[crop], spacing)
    return _nearest_distances(pred_points, gt_points), _nearest_distances(gt_points, pred_points)


def binary_metrics(pred, gt, spacing=None, empty_policy: str = "metrics_reloaded") -> dict:
    """Dice, Jaccard, HD95 and ASD of one binary prediction against its ground truth.

    Args:
        pred, gt: boolean (or 0/1) masks of the same 2D or 3D shape.
        spacing: voxel size per axis (or one number for all); None = distances in voxels.
        empty_policy: what to report when a mask is empty (medpy raises there):
            "metrics_reloaded" (default): both empty -> dice 1, jaccard 1, hd95 0, asd 0;
                exactly one empty -> dice 0, jaccard 0, hd95 nan, asd nan (undefined; the
                aggregation step replaces nan by a stated worst-case value).
            "reference": the upstream habit, (0, 0, 0, 0) whenever either mask is empty.

    Returns:
        dict with dice, jaccard, hd95, asd (floats), the voxel counts tp, fp, fn, tn, n_pred,
        n_ref (ints), empty_pred, empty_gt (bools) and policy_applied (the policy name when an
        empty mask decided the values, else None).
    """
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"empty_policy: unknown value {empty_policy!r}; options: {EMPTY_POLICIES}")
    pred = _as_mask(pred, "pred")
    gt = _as_mask(gt, "gt")
    _check_pair(pred, gt)
    spacing = _check_spacing(spacing, pred.ndim)

    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(gt))
    tp = int(np.count_nonzero(pred & gt))
    record = {
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_ref - tp,
        "tn": int(pred.size - n_pred - n_ref + tp),
        "n_pred": n_pred,
        "n_ref": n_ref,
        "empty_pred": n_pred == 0,
        "empty_gt": n_ref == 0,
        "policy_applied": None,
    }
    if n_pred == 0 or n_ref == 0:
        table = _BOTH_EMPTY if n_pred == n_ref else _ONE_EMPTY
        dice, jaccard, hd95, asd = table[empty_policy]
        record.update(dice=dice, jaccard=jaccard, hd95=hd95, asd=asd, policy_applied=empty_policy)
        return record

    pred_to_gt, gt_to_pred = surface_distances(pred, gt, spacing)
    record.update(
        dice=2.0 * tp / (n_pred + n_ref),
        jaccard=tp / (n_pred + n_ref - tp),
        hd95=float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95)),
        asd=float(pred_to_gt.mean()),
    )
    return record


def multiclass_metrics(
    pred_labels,
    gt_labels,
    classes: Iterable[int],
    spacing: Sequence[float] | float | None = None,
    empty_policy: str = "metrics_reloaded",
) -> list[dict]:
    """`binary_metrics(pred_labels == c, gt_labels == c)` per class c, with "class": c added."""
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(
            f"pred_labels and gt_labels must have the same shape, "
            f"got {pred_labels.shape} and {gt_labels.shape}"
        )
    records = []
    for cls in classes:
        record = binary_metrics(
            pred_labels == cls, gt_labels == cls, spacing=spacing, empty_policy=empty_policy
        )
        record["class"] = int(cls)
        records.append(record)
    return records
