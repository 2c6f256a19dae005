"""Largest connected component of a mask, or of every foreground class of a label map.

One implementation for its two users: evaluation's optional post-processing (SS-Net's and BCP's
LA tests) and BCP's pseudo-labels (get_cut_mask / get_ACDC_masks with nms=1). Connectivity is
full by default, as in skimage.measure.label, which both references call.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Keep only the largest connected component of a boolean mask; empty stays empty.

    connectivity: orthogonal hops that make two voxels neighbours (1 = faces only, ndim = faces,
    edges and corners; default ndim). Ties keep the component met first in C order.
    """
    connectivity = mask.ndim if connectivity is None else connectivity
    if not 1 <= connectivity <= mask.ndim:
        raise ValueError(f"connectivity: expected 1..{mask.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def largest_component_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A label map with only the largest component of each foreground class 1..num_classes-1
    (full connectivity); a class with no voxel stays empty."""
    out = np.zeros_like(labels)
    for k in range(1, num_classes):
        out[largest_component(labels == k)] = k
    return out
