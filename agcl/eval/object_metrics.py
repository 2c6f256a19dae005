"""Object-level gland metrics of the GlaS challenge (Sirinukunwattana et al., MedIA 2017).

The same three numbers are used by MILD-Net (Graham et al., MedIA 2019) on CRAG. Objects are the
instances of an integer map (0 = background; one id = one object, even if its pixels are not
connected). A boolean mask is first split into connected components by `to_instances`.

Notation: G_1..G_n ground-truth objects, S_1..S_m predicted objects, |X| = pixel count.
Overlap partner: S*(G_i) is the predicted object with the largest pixel overlap with G_i, and
G*(S_j) the ground-truth object with the largest overlap with S_j; ties go to the smaller id (what
MATLAB's `mode` does in the official evaluation code). An object that overlaps nothing on the
other side has no overlap partner.

Empty images (no objects in one or both maps) are defined explicitly in `object_metrics`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from agcl.common.components import label_components


def to_instances(mask, connectivity: int | None = None) -> np.ndarray:
    """Label the connected components of a binary mask: int32 map, 0 = background, ids 1..k.

    connectivity: orthogonal hops that make two pixels neighbours; default ndim (8-connectivity in
    2D), as MATLAB's bwlabel in the GlaS code and skimage.measure.label in MILD-Net.
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask: expected a boolean array, got dtype {mask.dtype}")
    return label_components(mask, connectivity)[0]


def _as_instances(array, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return to_instances(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer instance map or a boolean mask, "
                        f"got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name}: instance ids must be >= 0 (0 = background), found {array.min()}")
    return array


def _compact(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel ids to 1..k in increasing id order (so 'smaller index' = 'smaller id')."""
    ids, inverse = np.unique(instances, return_inverse=True)
    inverse = inverse.reshape(instances.shape)
    if ids[0] != 0:  # no background pixel: shift so that index 0 stays background
        inverse = inverse + 1
        return inverse, len(ids)
    return inverse, len(ids) - 1


class _Objects:
    """Pixel coordinates and a k-d tree of the border of every object of one compact map."""

    def __init__(self, labels: np.ndarray, count: int):
        self.labels = labels
        self.count = count
        self._boxes = ndimage.find_objects(labels, max_label=count)
        self._pixels: dict[int, np.ndarray] = {}
        self._trees: dict[int, cKDTree] = {}

    def box(self, index: int) -> tuple[slice, ...]:
        return self._boxes[index - 1]

    def pixels(self, index: int) -> np.ndarray:
        if index not in self._pixels:
            box = self._boxes[index - 1]
            local = np.argwhere(self.labels[box] == index)
            self._pixels[index] = local + np.array([s.start for s in box])
        return self._pixels[index]

    def border_tree(self, index: int) -> cKDTree:
        # The nearest object pixel to any outside point is a border pixel (one with a 4-neighbour
        # outside the object), so a tree of border pixels gives exact distances to the object.
        if index not in self._trees:
            box = self._boxes[index - 1]
            inside = self.labels[box] == index
            cross = ndimage.generate_binary_structure(inside.ndim, 1)
            eroded = ndimage.binary_erosion(inside, structure=cross)
            border = np.argwhere(inside & ~eroded) + np.array([s.start for s in box])
            self._trees[index] = cKDTree(border)
        return self._trees[index]


# Measured cost ratio of one distance-transform pixel to one k-d tree query (~0.15 µs vs ~1 µs).
_EDT_PIXEL_COST = 0.15


def _directed_hausdorff(a: _Objects, ia: int, b: _Objects, ib: int) -> float:
    """max over pixels p of object A of the distance from p to the nearest pixel of object B."""
    points = a.pixels(ia)
    outside = points[b.labels[tuple(points.T)] != ib]  # pixels inside B are at distance 0
    if len(outside) == 0:
        return 0.0
    box_a, box_b = a.box(ia), b.box(ib)
    union = tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(box_a, box_b))
    area = math.prod(s.stop - s.start for s in union)
    if area * _EDT_PIXEL_COST < len(outside):
        # Many query pixels (e.g. a large merged object): one exact distance transform over the
        # box around both objects is cheaper; B lies inside the box, so distances are unchanged.
        distance_to_b = ndimage.distance_transform_edt(b.labels[union] != ib)
        local = outside - np.array([s.start for s in union])
        return float(distance_to_b[tuple(local.T)].max())
    distances, _ = b.border_tree(ib).query(outside, k=1)
    return float(distances.max())


def _hausdorff(a: _Objects, ia: int, b: _Objects, ib: int) -> float:
    return max(_directed_hausdorff(a, ia, b, ib), _directed_hausdorff(b, ib, a, ia))


def _best_overlap(overlap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (object 1..k of one map): index of its max-overlap partner (0 = none), overlap."""
    counts = overlap[1:, 1:]
    if counts.shape[1] == 0:
        return np.zeros(counts.shape[0], dtype=np.int64), np.zeros(counts.shape[0], dtype=np.int64)
    best = counts.argmax(axis=1)  # first maximum = smaller id
    best_count = counts[np.arange(counts.shape[0]), best]
    return np.where(best_count > 0, best + 1, 0), best_count


def object_metrics(pred_instances, gt_instances) -> dict:
    """Object F1, object Dice and object Hausdorff (pixels) of one image, GlaS definitions.

    Detection (F1): each predicted object S_j is compared with its overlap partner G = G*(S_j);
    S_j is a true positive iff |S_j & G| > 0.5 * |G| (strictly more than half of the GROUND-TRUTH
    object's area, the rule of the official GlaS code). Two disjoint predictions cannot both cover
    more than half of one gland, so each gland is matched at most once.
    tp = matched predictions, fp = m - tp, fn = n - tp, F1 = 2 tp / (2 tp + fp + fn).

    Object Dice:
        1/2 * [ sum_i |G_i|/sum|G| * Dice(G_i, S*(G_i)) + sum_j |S_j|/sum|S| * Dice(G*(S_j), S_j) ]
    where Dice with no overlap partner is 0.

    Object Hausdorff:
        1/2 * [ sum_i |G_i|/sum|G| * H(G_i, S*(G_i)) + sum_j |S_j|/sum|S| * H(G*(S_j), S_j) ]
    H = symmetric Hausdorff distance between the two objects' full pixel sets (Euclidean, pixels).
    An object without an overlap partner is paired with the object of the other map that has the
    smallest H to it, as in the official GlaS code.

    Empty images: no objects in either map -> F1 1, Dice 1, Hausdorff 0. Objects in exactly one
    map -> F1 0, Dice 0, Hausdorff nan (no object to measure a distance to; aggregation must state
    what it substitutes). "empty_pred"/"empty_gt" flag these cases.
    """
    pred = _as_instances(pred_instances, "pred_instances")
    gt = _as_instances(gt_instances, "gt_instances")
    if pred.shape != gt.shape:
        raise ValueError(
            "pred_instances and gt_instances must have the same shape, "
            f"got {pred.shape} and {gt.shape}"
        )
    pred_labels, n_pred = _compact(pred)
    gt_labels, n_gt = _compact(gt)
    record = {"n_pred": n_pred, "n_gt": n_gt, "empty_pred": n_pred == 0, "empty_gt": n_gt == 0}
    if n_pred == 0 or n_gt == 0:
        both = n_pred == n_gt
        record.update(
            object_f1=1.0 if both else 0.0,
            object_dice=1.0 if both else 0.0,
            object_hausdorff=0.0 if both else math.nan,
            tp=0, fp=n_pred, fn=n_gt,
        )
        return record

    # overlap[j, i] = pixels with pred index j and gt index i (index 0 = background).
    overlap = np.bincount(
        (pred_labels.ravel().astype(np.int64) * (n_gt + 1) + gt_labels.ravel()),
        minlength=(n_pred + 1) * (n_gt + 1),
    ).reshape(n_pred + 1, n_gt + 1)
    pred_area = overlap[1:, :].sum(axis=1)
    gt_area = overlap[:, 1:].sum(axis=0)
    gt_of_pred, pred_overlap = _best_overlap(overlap)
    pred_of_gt, gt_overlap = _best_overlap(overlap.T)

    matched = (gt_of_pred > 0) & (pred_overlap > 0.5 * gt_area[np.maximum(gt_of_pred, 1) - 1])
    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_gt - tp

    pred_weight = pred_area / pred_area.sum()
    gt_weight = gt_area / gt_area.sum()
    dice_pred_side = np.where(
        gt_of_pred > 0,
        2.0 * pred_overlap / (pred_area + gt_area[np.maximum(gt_of_pred, 1) - 1]),
        0.0,
    )
    dice_gt_side = np.where(
        pred_of_gt > 0,
        2.0 * gt_overlap / (gt_area + pred_area[np.maximum(pred_of_gt, 1) - 1]),
        0.0,
    )
    object_dice = 0.5 * (pred_weight @ dice_pred_side + gt_weight @ dice_gt_side)

    preds, gts = _Objects(pred_labels, n_pred), _Objects(gt_labels, n_gt)
    cache: dict[tuple[int, int], float] = {}

    def hausdorff(ip: int, ig: int) -> float:
        if (ip, ig) not in cache:
            cache[ip, ig] = _hausdorff(preds, ip, gts, ig)
        return cache[ip, ig]

    def side(partners: np.ndarray, n_others: int, distance) -> np.ndarray:
        """Each object's Hausdorff to its partner, or to the nearest object if it has none."""
        return np.array([distance(k, int(partner)) if partner
                         else min(distance(k, o) for o in range(1, n_others + 1))
                         for k, partner in enumerate(partners, start=1)], dtype=float)

    haus_pred_side = side(gt_of_pred, n_gt, hausdorff)
    haus_gt_side = side(pred_of_gt, n_pred, lambda ig, ip: hausdorff(ip, ig))
    object_hausdorff = 0.5 * (pred_weight @ haus_pred_side + gt_weight @ haus_gt_side)

    record.update(
        object_f1=2.0 * tp / (2 * tp + fp + fn),
        object_dice=float(object_dice),
        object_hausdorff=float(object_hausdorff),
        tp=tp, fp=fp, fn=fn,
    )
    return record
