"""The largest-component filter in torch (BCP's pseudo-labels, kept on the GPU) gives scipy's
result voxel for voxel: components, full connectivity, ties and empty classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from agcl.common.components import largest_component_per_class, largest_component_per_class_tensor


def scipy_reference(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.stack([largest_component_per_class(sample, num_classes) for sample in labels])


@pytest.mark.parametrize("shape, num_classes, smooth", [
    ((3, 40, 36), 4, 1.5),       # ACDC-like 2D slices, 3 foreground classes
    ((2, 24, 20, 16), 2, 1.0),   # LA-like volumes
    ((2, 24, 20, 16), 3, 0.0),   # speckle: many components, diagonal contacts
    ((4, 9, 7), 3, 0.0),
])
def test_same_components_as_scipy(shape, num_classes, smooth):
    rng = np.random.default_rng(0)
    removed = 0
    for trial in range(5):
        field = rng.normal(size=(shape[0], num_classes, *shape[1:]))
        if smooth:
            field = ndimage.gaussian_filter(field, [0, 0] + [smooth] * (len(shape) - 1))
        labels = field.argmax(1) * (field.max(1) > 0.1 * trial)  # background grows with trial
        want = scipy_reference(labels, num_classes)
        got = largest_component_per_class_tensor(torch.from_numpy(labels), num_classes)
        assert got.dtype == torch.int64 and got.shape == labels.shape
        np.testing.assert_array_equal(got.numpy(), want)
        removed += (labels > 0).sum() - (want > 0).sum()
    assert removed > 0  # components were dropped: the comparison is not between two no-ops


def test_a_long_spiral_is_one_component():
    """A component far longer than it is wide (many propagation rounds) stays whole."""
    grid = np.zeros((1, 41, 41), np.int64)
    top, left, bottom, right = 0, 0, 40, 40
    while top <= bottom and left <= right:  # a square spiral with one-pixel gaps
        grid[0, top, left:right + 1] = 1
        grid[0, top:bottom + 1, right] = 1
        if top + 2 <= bottom:
            grid[0, bottom, left:right + 1] = 1
        if left + 2 <= right:
            grid[0, top + 2:bottom + 1, left] = 1
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    grid[0, 20, 30:] = 0  # cut it: two components of different sizes
    got = largest_component_per_class_tensor(torch.from_numpy(grid), 2).numpy()
    np.testing.assert_array_equal(got, scipy_reference(grid, 2))
    assert 0 < got.sum() < grid.sum()


def test_ties_keep_the_first_component_in_c_order_and_empty_classes_stay_empty():
    labels = np.zeros((1, 6, 6), np.int64)
    labels[0, 4:6, 0:2] = 1  # met second in C order
    labels[0, 0:2, 4:6] = 1  # met first: same size
    got = largest_component_per_class_tensor(torch.from_numpy(labels), 3).numpy()
    want = np.zeros_like(labels)
    want[0, 0:2, 4:6] = 1
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, scipy_reference(labels, 3))
    with pytest.raises(ValueError, match=r"expected \(B, H, W\) or \(B, D, H, W\)"):
        largest_component_per_class_tensor(torch.zeros(4, dtype=torch.int64), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bcp_filters_pseudo_labels_on_the_gpu_as_on_the_host():
    from agcl.common.components import largest_component_per_class_batch as bcp_filter

    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.integers(0, 4, size=(3, 32, 40)))
    on_gpu = bcp_filter(labels.cuda(), 4)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), bcp_filter(labels, 4), rtol=0, atol=0)
