"""Resampling of label and image arrays, shared by data loading and inference."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour zoom of the last two axes to `size`, as the ACDC references (order 0)."""
    factors = [1.0] * (array.ndim - 2) + [size[0] / array.shape[-2], size[1] / array.shape[-1]]
    out = ndimage.zoom(array, factors, order=0)
    if out.shape[-2:] != tuple(size):  # zoom's rounding missed: nearest by index instead
        rows = np.minimum((np.arange(size[0]) * array.shape[-2] / size[0]).astype(int),
                          array.shape[-2] - 1)
        cols = np.minimum((np.arange(size[1]) * array.shape[-1] / size[1]).astype(int),
                          array.shape[-1] - 1)
        out = array[..., rows, :][..., cols]
    return out
