import itertools

import numpy as np
import pytest
import torch
from torch import nn

from agcl.nets.inference import (
    dice_per_class,
    predict_slices,
    sliding_window_probabilities,
    window_starts,
)


@pytest.mark.parametrize("size,patch,stride,expected", [
    (144, 112, 18, [0, 18, 32]),          # ceil(32/18)+1 = 3, last clamped to 144-112
    (88, 80, 4, [0, 4, 8]),
    (112, 112, 18, [0]),
    (100, 112, 18, [0]),                  # smaller than the patch: padded, one window
    (130, 112, 18, [0, 18]),
])
def test_reference_window_positions(size, patch, stride, expected):
    assert window_starts(size, patch, stride) == expected


class CountingNet(nn.Module):
    """Logits that make softmax class 1 equal to a known function of the input, and log windows."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.extend(tuple(w.shape) for w in x)
        return torch.cat([torch.zeros_like(x), x], dim=1)  # softmax_1 = sigmoid(x)


def test_sliding_window_averages_overlaps_and_restores_shape():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 20, 13, 9)).astype(np.float32)
    net = CountingNet()
    probs = sliding_window_probabilities(net, image, [8, 8, 8], [4, 4, 4], 2, torch.device("cpu"),
                                         window_batch=3)
    assert probs.shape == (2, 20, 13, 9)
    # every window gives the exact per-voxel value, so the average equals it wherever padded
    # regions are not involved (all windows see the same voxel value)
    sig = 1 / (1 + np.exp(-image[0]))
    np.testing.assert_allclose(probs[1], sig, rtol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-6)
    xs, ys, zs = window_starts(20, 8, 4), window_starts(13, 8, 4), window_starts(9, 8, 4)
    assert len(net.seen) == len(list(itertools.product(xs, ys, zs)))
    assert all(s == (1, 8, 8, 8) for s in net.seen)


def test_predict_slices_restores_original_grid():
    volume = np.zeros((1, 3, 30, 22), dtype=np.float32)
    volume[0, :, 10:20, 5:15] = 5.0
    labels = predict_slices(CountingNet(), volume, [32, 32], torch.device("cpu"))
    assert labels.shape == (3, 30, 22)
    assert labels[:, 10:20, 5:15].all() and labels.sum() == 3 * 10 * 10


def test_dice_per_class():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    gt = np.array([[0, 1, 0], [2, 0, 0]])
    # class 1: 2*1/(2+1); class 2: 2*1/(2+1); class 3 empty in both -> 1
    assert dice_per_class(pred, gt, 4) == pytest.approx([2 / 3, 2 / 3, 1.0])
