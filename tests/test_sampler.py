"""The two-stream sampler's augmentation follows the references per dataset, and its tensor
ops give exactly what numpy's rot90/flip and scipy's rotate give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from agcl.data.loaders import (
    ROTATION_DEGREES,
    PatchSampler,
    TrainingSet,
    default_augmentation,
    rotation_source_index,
)
from agcl.runtime.random_streams import numpy_stream


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
        images, labels = (t.numpy() for t in sampler.next_batch()[:2])
        where = tuple(int(i) for i in np.argwhere(images[0, 0] > 0.5)[0])
        assert where in allowed and labels[0][where] == 1


def test_half_of_the_2d_samples_are_rotated_by_a_small_angle_with_the_label():
    sampler = PatchSampler(one_pixel_set(), [16, 16], 1, 0, seed=0,
                           augmentation="rot_flip_or_rotate")
    allowed = rot_flip_positions()
    rotated = 0
    n = 400
    for _ in range(n):
        images, labels = (t.numpy() for t in sampler.next_batch()[:2])
        image, label = images[0, 0], labels[0]
        # nearest neighbour for both: the label is still exactly where the image pixel went
        assert np.array_equal(image > 0.5, label == 1)
        found = np.argwhere(image > 0.5)
        if len(found) != 1 or tuple(int(i) for i in found[0]) not in allowed:
            rotated += 1
    # P(rotation) = 1/2; an angle of 0 (1 in 40) or one that keeps the pixel in place looks like
    # a symmetry, so a little under half
    assert 0.38 < rotated / n < 0.55


@pytest.mark.parametrize("shape", [(48, 48), (20, 28)])
def test_rotation_gather_is_scipys_nearest_rotation_at_every_angle(shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    label = rng.integers(1, 4, size=shape).astype(np.uint8)  # no zeros: the fill is visible
    for angle in range(*ROTATION_DEGREES):
        index = rotation_source_index(angle, shape)
        inside = index >= 0
        assert inside.sum() > 0.7 * index.size  # a small rotation keeps most of the patch
        got_image = np.where(inside, image.reshape(2, -1)[:, index.clip(0)], 0)
        got_label = np.where(inside, label.reshape(-1)[index.clip(0)], 0)
        np.testing.assert_array_equal(
            got_image, ndimage.rotate(image, angle, axes=(2, 1), order=0, reshape=False))
        np.testing.assert_array_equal(
            got_label, ndimage.rotate(label, angle, axes=(1, 0), order=0, reshape=False))


def numpy_oracle(data: TrainingSet, patch, labeled_batch, unlabeled_batch, seed, augmentation,
                 steps):
    """The sampler written with numpy and scipy on the host, drawing in the same order, labeled
    and unlabeled images each from its own stream."""
    rngs = {s: numpy_stream(seed, f"{s}_batches") for s in ("labeled", "unlabeled")}
    queues = {"labeled": [], "unlabeled": []}

    def take(stream, count, size):
        while len(queues[stream]) < count:
            queues[stream].extend(int(i) for i in rngs[stream].permutation(size))
        out, queues[stream] = queues[stream][:count], queues[stream][count:]
        return out

    def sample(image, label):
        rng = rngs["labeled" if label is not None else "unlabeled"]
        pads = [max(0, p - s) for p, s in zip(patch, image.shape[1:])]
        widths = [(pad // 2, pad - pad // 2) for pad in pads]
        image = np.pad(image, [(0, 0), *widths])
        label = np.pad(label, widths) if label is not None else None
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], patch)]
        region = tuple(slice(st, st + p) for st, p in zip(starts, patch))
        image, label = image[(slice(None), *region)], (label[region] if label is not None else None)
        if augmentation == "rot_flip_or_rotate" and rng.random() >= 0.5:
            angle = int(rng.integers(*ROTATION_DEGREES))
            image = ndimage.rotate(image, angle, axes=(2, 1), order=0, reshape=False)
            label = (ndimage.rotate(label, angle, axes=(1, 0), order=0, reshape=False)
                     if label is not None else None)
            return image, label
        k = int(rng.integers(0, 4)) if patch[0] == patch[1] else 0
        axis = int(rng.integers(0, 2))
        image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1)
        label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis) if label is not None else None
        return image, label

    for _ in range(steps):
        pairs = [sample(data.labeled_images[i], data.labeled_labels[i])
                 for i in take("labeled", labeled_batch, len(data.labeled_images))]
        unlabeled = [sample(data.unlabeled_images[i], None)[0]
                     for i in take("unlabeled", unlabeled_batch, len(data.unlabeled_images))]
        yield (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.int64),
               np.stack(unlabeled))


def random_set(shapes, seed=0) -> TrainingSet:
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=(1, *s)).astype(np.float32) for s in shapes]
    labels = [rng.integers(0, 3, size=s).astype(np.uint8) for s in shapes]
    return TrainingSet(images[:3], labels[:3], images[3:])


@pytest.mark.parametrize("augmentation, patch, shapes", [
    ("rot_flip_or_rotate", [24, 24], [(30, 26), (24, 40), (20, 30), (26, 26), (28, 22)]),
    ("rot_flip", [12, 12, 8], [(14, 16, 10), (12, 13, 6), (20, 12, 9), (15, 15, 15)]),
    ("rot_flip", [12, 16, 8], [(14, 16, 10), (12, 18, 9), (20, 17, 9), (15, 16, 15)]),
    ("rot_flip_or_rotate", [12, 12, 8], [(14, 16, 10), (12, 13, 6), (20, 12, 9), (15, 15, 15)]),
])
def test_batches_are_numpys_bit_for_bit(augmentation, patch, shapes):
    """Same seed -> the same crops, rot90s, flips and rotations as the host numpy/scipy recipe,
    including images smaller than the patch (padded) and non-square patches (no rot90)."""
    data = random_set(shapes)
    sampler = PatchSampler(data, patch, 2, 3, seed=7, augmentation=augmentation)
    for want in numpy_oracle(data, patch, 2, 3, 7, augmentation, steps=30):
        got = sampler.next_batch()
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.numpy(), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_set_on_the_gpu_gives_the_host_batches():
    data = random_set([(30, 26), (24, 40), (20, 30), (26, 26), (28, 22)])
    host = PatchSampler(data, [24, 24], 2, 3, seed=3, augmentation="rot_flip_or_rotate")
    gpu = PatchSampler(data, [24, 24], 2, 3, seed=3, augmentation="rot_flip_or_rotate",
                       device="cuda")
    for _ in range(20):
        for h, g in zip(host.next_batch(), gpu.next_batch()):
            assert g.device.type == "cuda"
            torch.testing.assert_close(g.cpu(), h, rtol=0, atol=0)


def test_ss_nets_random_generator_is_rot_flip_half_rotate_quarter_nothing_quarter():
    """SS-Net's RandomGenerator (its dataloaders/dataset.py, the branch structure read from the
    text): rot90 + flip if random() > 0.5, elif random() > 0.5 a rotation, else nothing."""
    import re

    from tests.reference_code import reference_source

    text = reference_source("ycwu1997/SS-Net", "dataloaders/dataset.py")
    body = text[text.index("class RandomGenerator"):]
    assert re.search(r"if random\.random\(\) > 0\.5:\s*image, label = random_rot_flip\(image, "
                     r"label\)\s*elif random\.random\(\) > 0\.5:\s*image, label = "
                     r"random_rotate\(image, label\)\s*x, y = image\.shape", body)
    # a pixel far from the centre: a rotation by more than about a degree moves it
    sampler = PatchSampler(one_pixel_set(48), [48, 48], 1, 0, seed=0,
                           augmentation="rot_flip_rotate_or_none")
    allowed = rot_flip_positions(48)
    untouched = rotated = 0
    n = 2000
    for _ in range(n):
        image = sampler.next_batch()[0].numpy()[0, 0]
        found = [tuple(int(i) for i in p) for p in np.argwhere(image > 0.5)]
        if found == [(2, 5)]:
            untouched += 1  # nothing (1/4), or an angle near 0 that keeps the pixel
        elif len(found) != 1 or found[0] not in allowed:
            rotated += 1
    # expected: untouched 1/4 + ~0.02 (angles near 0), rotated 1/4 - that; SSL4MIS's would give
    # ~0.03 and ~0.43
    assert 0.23 < untouched / n < 0.31 and 0.18 < rotated / n < 0.26


def test_extra_unlabeled_batches_come_from_their_own_stream_and_resume_exactly():
    data = random_set([(40, 40)] * 6)
    plain = PatchSampler(data, [24, 24], 2, 3, seed=5, augmentation="rot_flip")
    extra = PatchSampler(data, [24, 24], 2, 3, seed=5, augmentation="rot_flip", extra_unlabeled=2)
    assert plain.next_extra_unlabeled() == []
    for step in range(4):
        a, b = plain.next_batch(), extra.next_batch()
        # the main streams are untouched by the extra draws
        assert all(torch.equal(x, y) for x, y in zip(a, b)), step
        batches = extra.next_extra_unlabeled()
        assert len(batches) == 2 and all(x.shape == b[2].shape for x in batches)
        assert not torch.equal(batches[0], batches[1])
    saved = extra.state_dict()
    expected = (extra.next_batch(), extra.next_extra_unlabeled())
    resumed = PatchSampler(data, [24, 24], 2, 3, seed=5, augmentation="rot_flip",
                           extra_unlabeled=2)
    resumed.load_state_dict(saved)
    got = (resumed.next_batch(), resumed.next_extra_unlabeled())
    assert all(torch.equal(x, y) for x, y in zip(expected[0], got[0]))
    assert all(torch.equal(x, y) for x, y in zip(expected[1], got[1]))
    with pytest.raises(ValueError, match="expected the RNG states of the streams"):
        plain.load_state_dict(saved)
