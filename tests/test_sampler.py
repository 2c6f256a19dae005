"""The two-stream sampler's augmentation follows the references per dataset."""

from __future__ import annotations

import numpy as np
import pytest

from agcl.data.loaders import PatchSampler, TrainingSet, default_augmentation


def one_pixel_set(size: int = 16) -> TrainingSet:
    image = np.zeros((1, size, size), np.float32)
    image[0, 2, 5] = 1.0
    label = (image[0] > 0).astype(np.uint8)
    return TrainingSet([image], [label])


def rot_flip_positions(size: int = 16) -> set[tuple[int, int]]:
    """Where the pixel at (2, 5) can land under rot90 x flip: the 8 symmetries of the square."""
    grid = np.zeros((size, size))
    grid[2, 5] = 1
    out = set()
    for k in range(4):
        for axis in (0, 1):
            moved = np.flip(np.rot90(grid, k), axis)
            out.add(tuple(int(i) for i in np.argwhere(moved)[0]))
    return out


def test_defaults_per_dataset():
    assert default_augmentation(3) == "rot_flip" and default_augmentation(2) == "rot_flip_or_rotate"
    with pytest.raises(ValueError, match="augmentation: expected one of rot_flip"):
        PatchSampler(one_pixel_set(), [16, 16], 1, 0, 0, augmentation="elastic")


def test_rot_flip_only_permutes_the_square():
    sampler = PatchSampler(one_pixel_set(), [16, 16], 1, 0, seed=0, augmentation="rot_flip")
    allowed = rot_flip_positions()
    for _ in range(100):
        images, labels, _ = sampler.next_batch()
        where = tuple(int(i) for i in np.argwhere(images[0, 0] > 0.5)[0])
        assert where in allowed and labels[0][where] == 1


def test_half_of_the_2d_samples_are_rotated_by_a_small_angle_with_the_label():
    sampler = PatchSampler(one_pixel_set(), [16, 16], 1, 0, seed=0,
                           augmentation="rot_flip_or_rotate")
    allowed = rot_flip_positions()
    rotated = 0
    n = 400
    for _ in range(n):
        images, labels, _ = sampler.next_batch()
        image, label = images[0, 0], labels[0]
        # nearest neighbour for both: the label is still exactly where the image pixel went
        assert np.array_equal(image > 0.5, label == 1)
        found = np.argwhere(image > 0.5)
        if len(found) != 1 or tuple(int(i) for i in found[0]) not in allowed:
            rotated += 1
    # P(rotation) = 1/2; an angle of 0 (1 in 40) or one that keeps the pixel in place looks like
    # a symmetry, so a little under half
    assert 0.38 < rotated / n < 0.55
