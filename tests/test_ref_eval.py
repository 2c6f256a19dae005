"""Our LA evaluation against the references' own test scripts: SS-Net utils/test_3d_patch.py
(softmax over two channels; the protocol BCP's LA test shares) and DTC code/test_util.py (one
sigmoid channel, the protocol SASSNet's test shares): the same volume and network through their
test_single_case / test_all_case and through ours give the same prediction and the same Dice,
Jaccard, HD95 and ASD, with and without their --nms largest-component step.

The reference runs as written; only what it cannot run on here is bridged: `.cuda()` is the
identity on a CPU machine, numpy 2 has no `np.int` (it meant the builtin int), and nibabel is
a stub (save_result=False, it writes nothing).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage

from agcl.common.components import largest_component_per_class
from agcl.eval.metrics import binary_metrics
from agcl.nets.inference import sliding_window_probabilities
from tests.reference_code import reference_modules

REPO = "ycwu1997/SS-Net"
DTC = "HiLab-git/DTC"
PATCH, STRIDE_XY, STRIDE_Z = (24, 24, 16), 6, 4


class PositionDependentNet(torch.nn.Module):
    """A fixed conv net whose output depends on where a window starts (zero padding at its
    borders), so the averaging over overlapping windows matters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 2, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.mul_(0.3)
            self.conv.weight[1] += 0.4 / 125
            self.conv.bias.copy_(torch.tensor([0.0, -0.05]))

    def forward(self, x):
        return self.conv(x)


def volume(seed: int):
    """An LA-like case: a smooth blob of foreground (and a small detached island) in noise."""
    rng = np.random.default_rng(seed)
    shape = (40, 36, 30)
    grid = np.indices(shape).astype(float)
    centre = np.array(shape)[:, None, None, None] / 2
    label = (((grid - centre) ** 2 / np.array([90, 70, 50])[:, None, None, None]).sum(0)
             < 1).astype(np.uint8)
    label[3:6, 3:6, 3:6] = 1  # an island: the largest-component step removes it
    image = ndimage.gaussian_filter(label.astype(float) + rng.normal(0, 0.6, shape), 1.0)
    return ((image - image.mean()) / image.std()).astype(np.float32), label


def assert_our_evaluation_is(net, image, label, nms, theirs, their_metrics) -> np.ndarray:
    """Our evaluation of the volume (sliding window, argmax, the largest component where `nms`,
    metrics in voxels): the reference's prediction voxel for voxel, and its four metrics."""
    with torch.no_grad():
        probs = sliding_window_probabilities(net, image[None], list(PATCH),
                                             [STRIDE_XY, STRIDE_XY, STRIDE_Z], 2,
                                             torch.device("cpu"))
    ours = probs.argmax(axis=0).astype(np.uint8)
    if nms:
        ours = largest_component_per_class(ours, 2)
    assert 0 < ours.sum() < ours.size and (ours != label).any()  # a non-trivial prediction
    np.testing.assert_array_equal(ours.astype(bool), np.asarray(theirs).astype(bool))
    mine = binary_metrics(ours == 1, label == 1)
    np.testing.assert_allclose([mine[m] for m in ("dice", "jaccard", "hd95", "asd")],
                               their_metrics, rtol=1e-12, atol=1e-12)
    return ours


@pytest.fixture
def reference_test(monkeypatch):
    module = reference_modules(REPO, "utils.test_3d_patch", stubs=("tensorboardX", "nibabel"))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=False)
    monkeypatch.setattr(np, "int", int, raising=False)
    return module


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("nms", [0, 1])
def test_evaluation_equals_the_reference_test_script(reference_test, tmp_path, seed, nms):
    image, label = volume(seed)
    net = PositionDependentNet().eval()
    path = tmp_path / "case.h5"
    (tmp_path / "predictions").mkdir()
    with h5py.File(path, "w") as h5:
        h5["image"], h5["label"] = image, label

    def their_model(x):  # SS-Net's VNet returns (logits, features)
        return net(x), None

    theirs, _ = reference_test.test_single_case(their_model, image, STRIDE_XY, STRIDE_Z, PATCH,
                                                num_classes=2)
    if nms:
        theirs = reference_test.getLargestCC(theirs)
    their_metrics = reference_test.test_all_case(
        their_model, [str(path)], num_classes=2, patch_size=PATCH, stride_xy=STRIDE_XY,
        stride_z=STRIDE_Z, save_result=False, test_save_path=f"{tmp_path}/predictions/",
        metric_detail=1, nms=nms)  # it writes its average to <test_save_path>/../performance.txt

    ours = assert_our_evaluation_is(net, image, label, nms, theirs, their_metrics)
    if nms == 0:  # the island and the noise leave several components: the step matters
        assert ndimage.label(ours)[1] > 1


class SdfHeadNet(PositionDependentNet):
    """DTC's interface: (tanh distance map, one foreground logit); our side sees [0, z]."""

    def reference(self, x):
        logits = self.conv(x)
        z = logits[:, 1:] - logits[:, :1]
        return torch.tanh(z), z

    def forward(self, x):  # ours: two-class logits whose softmax is sigmoid(z)
        _, z = self.reference(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


@pytest.mark.parametrize("nms", [0, 1])
def test_evaluation_equals_dtcs_sigmoid_test_script(monkeypatch, tmp_path, nms):
    module = reference_modules(DTC, "test_util", stubs=("tensorboardX", "nibabel"))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=False)
    monkeypatch.setattr(np, "int", int, raising=False)
    image, label = volume(2)
    net = SdfHeadNet().eval()
    path = tmp_path / "case.h5"
    with h5py.File(path, "w") as h5:
        h5["image"], h5["label"] = image, label
    theirs, _ = module.test_single_case(net.reference, image, STRIDE_XY, STRIDE_Z, PATCH,
                                        num_classes=1)
    if nms:
        theirs = module.getLargestCC(theirs)
    their_metrics = module.test_all_case(net.reference, [str(path)], num_classes=1,
                                         patch_size=PATCH, stride_xy=STRIDE_XY,
                                         stride_z=STRIDE_Z, save_result=False,
                                         metric_detail=1, nms=nms)
    assert_our_evaluation_is(net, image, label, nms, theirs, their_metrics)
