"""vnet_sdf and agcl.methods.sdf against the reference code they follow (DTC and SASSnet).

Networks: the reference VNet of code/networks/vnet_sdf.py as train_la_dtc.py:113-114 and
SASSnet's train_gan_sdfloss.py:94 build it, its state dict mapped into ours; same outputs in
train mode (same dropout masks, batch statistics) and eval mode, same gradients of every
parameter. compute_sdf: the reference's utils/util.py function (which needs scikit-image) on
random, blob, empty, full, single-voxel and border masks. The supervised loss: Dice + beta * MSE
assembled from the references' losses.dice_loss and MSELoss, values and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agcl.methods.sdf import binary_dice_loss, compute_sdf, sdf_supervised_loss
from agcl.nets import build
from agcl.nets.vnet_sdf import from_reference_state_dict, two_class_logits
from tests.reference_code import reference_modules

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPOS = ["HiLab-git/DTC", "kleinzcy/SASSnet"]
SHAPE = (2, 1, 32, 32, 16)


def reference_net(repo: str, n_filters: int = 4):
    module = reference_modules(repo, "networks.vnet_sdf")
    return module.VNet(n_channels=1, n_classes=1, n_filters=n_filters,
                       normalization="batchnorm", has_dropout=True)


def net_pair(repo: str):
    """(reference, ours) in float64, ours loaded with the reference's random init."""
    torch.manual_seed(0)
    theirs = reference_net(repo).double()
    # BatchNorm starts at weight 1, bias 0, mean 0, var 1: perturb it so a swapped mapping shows.
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                for t in (module.weight, module.bias, module.running_mean):
                    t.add_(0.1 * torch.randn_like(t))
                module.running_var.uniform_(0.5, 1.5)
    ours = build("vnet_sdf", 1, 2, n_filters=4).double()
    ours.load_state_dict(from_reference_state_dict(theirs.state_dict()))
    return theirs, ours


def reference_util(repo: str):
    pytest.importorskip("skimage")
    return reference_modules(repo, "utils.util")


@pytest.mark.parametrize("repo", REPOS)
def test_parameter_count_at_real_width_equals_the_reference(repo):
    module = reference_modules(repo, "networks.vnet_sdf")
    with torch.device("meta"):
        theirs = module.VNet(n_channels=1, n_classes=1, normalization="batchnorm",
                             has_dropout=True)
        ours = build("vnet_sdf", 1, 2)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 9_448_866


@pytest.mark.parametrize("repo", REPOS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_gradients_equal_the_reference(repo, mode):
    theirs, ours = net_pair(repo)
    theirs.train(mode == "train")
    ours.train(mode == "train")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(7)  # the same dropout masks: both draw encoder then decoder, same shapes
    ref_sdf, ref_seg = theirs(x)
    torch.manual_seed(7)
    sdf, seg = ours.forward_sdf(x)
    torch.testing.assert_close(sdf, ref_sdf, rtol=0, atol=1e-12)
    torch.testing.assert_close(seg, ref_seg, rtol=0, atol=1e-12)
    assert sdf.shape == seg.shape == (2, 1, *SHAPE[2:])
    weights = torch.randn(2, *SHAPE[1:], dtype=torch.float64)
    (ref_sdf * weights + ref_seg**2).sum().backward()
    (sdf * weights + seg**2).sum().backward()
    grads = from_reference_state_dict({n: p.grad for n, p in theirs.named_parameters()})
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-10, atol=1e-12, msg=name)
    # The engine's view: logits [0, z] from the same forward.
    torch.manual_seed(7)
    logits, features = ours.forward_features(x)
    torch.testing.assert_close(logits, two_class_logits(ref_seg.detach()), rtol=0, atol=1e-12)
    assert features.shape == (2, 4, *SHAPE[2:])
    if mode == "eval":
        assert torch.equal(ours(x), logits)


def test_two_class_logits_are_the_sigmoid_exactly():
    z = torch.tensor([-30.0, -2.0, -1e-3, 0.0, 1e-3, 2.0, 30.0], dtype=torch.float64).view(1, 1, 7)
    logits = two_class_logits(z)
    torch.testing.assert_close(torch.softmax(logits, dim=1)[:, 1], torch.sigmoid(z)[:, 0],
                               rtol=1e-15, atol=1e-15)
    assert torch.equal(logits.argmax(dim=1), (z[:, 0] > 0).long())  # 0 -> background, as > 0.5


def test_vnet_sdf_is_binary():
    with pytest.raises(ValueError, match="num_classes must be 2"):
        build("vnet_sdf", 1, 4, n_filters=2)


def test_reference_state_dict_keys_map_one_to_one():
    ours = build("vnet_sdf", 1, 2, n_filters=2)
    theirs = reference_net("HiLab-git/DTC", n_filters=2)
    mapped = from_reference_state_dict(theirs.state_dict())
    assert sorted(mapped) == sorted(ours.state_dict())
    assert all(mapped[k].shape == v.shape for k, v in ours.state_dict().items())
    with pytest.raises(KeyError, match="not a parameter"):
        from_reference_state_dict({"head.weight": torch.zeros(1)})


def masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    blob = np.zeros((3, 20, 18, 12), dtype=np.int64)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in blob.shape[1:]), indexing="ij")
    for b, (cz, cy, cx, r) in enumerate([(10, 9, 6, 5), (2, 3, 0, 6), (15, 15, 11, 8)]):
        blob[b] = ((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
    single = np.zeros((2, 9, 8, 7), dtype=np.int64)
    single[0, 4, 3, 2] = 1
    single[1, 0, 0, 0] = 1  # a corner voxel
    slab = np.zeros((1, 10, 10, 6), dtype=np.int64)
    slab[0, :, :, :3] = 1  # touches five faces of the array
    return {
        "random": (rng.random((2, 12, 10, 8)) < 0.3).astype(np.int64),
        "blob": blob,
        "empty": np.zeros((2, 8, 8, 8), dtype=np.int64),
        "single": single,
        "slab": slab,
        "mixed": np.stack([blob[0], np.zeros_like(blob[0]), blob[2]]),
        "uint8": blob.astype(np.uint8),
        "2d": (rng.random((2, 16, 12)) < 0.5).astype(np.int64),
    }


@pytest.mark.parametrize("repo", REPOS)
@pytest.mark.parametrize("case", sorted(masks()))
def test_compute_sdf_equals_the_reference(repo, case):
    util = reference_util(repo)
    labels = masks()[case]
    expected = util.compute_sdf(labels, labels.shape)
    ours = compute_sdf(labels)
    assert ours.dtype == expected.dtype == np.float64
    np.testing.assert_array_equal(ours, expected)  # the same float operations: bit for bit
    if case not in ("empty",):
        assert ours.min() < 0 < ours.max() or case == "single"


@pytest.mark.parametrize("repo", REPOS)
def test_compute_sdf_of_a_full_mask_is_nan_as_the_reference(repo):
    util = reference_util(repo)
    labels = np.ones((1, 6, 6, 4), dtype=np.int64)
    with np.errstate(invalid="ignore"):
        expected = util.compute_sdf(labels, labels.shape)
        ours = compute_sdf(labels)
    assert np.isnan(expected).all() and np.isnan(ours).all()


def test_compute_sdf_on_a_single_voxel_and_a_blob():
    single = np.zeros((1, 5, 5, 5), dtype=np.int64)
    single[0, 2, 2, 2] = 1
    sdf = compute_sdf(single)[0]
    assert sdf[2, 2, 2] == 0 and sdf.max() == 1.0  # the voxel is its own boundary
    blob = masks()["blob"][:1]
    sdf = compute_sdf(blob)[0]
    assert sdf.min() == -1.0 and sdf.max() == 1.0
    assert (sdf[blob[0] == 0] > 0).all() and (sdf[blob[0] == 1] <= 0).all()


def test_supervised_loss_equals_the_reference_terms_and_gradients():
    losses = reference_modules("HiLab-git/DTC", "utils.losses")
    util = reference_util("HiLab-git/DTC")
    gen = torch.Generator().manual_seed(3)
    labels = torch.from_numpy(masks()["blob"][:2])
    sdf = torch.tanh(torch.randn(2, 1, *labels.shape[1:], generator=gen)).requires_grad_()
    seg = torch.randn(2, 1, *labels.shape[1:], generator=gen).requires_grad_()
    beta = 0.3
    ours = sdf_supervised_loss(sdf, seg, labels, beta)
    gt = torch.from_numpy(util.compute_sdf(labels.numpy(), seg[:, 0].shape)).float()
    ref_sdf = torch.nn.MSELoss()(sdf[:, 0], gt)
    ref_dice = losses.dice_loss(torch.sigmoid(seg)[:, 0], labels == 1)
    ref_bce = torch.nn.BCEWithLogitsLoss()(seg[:, 0], labels.float())
    for name, value in (("loss_sdf", ref_sdf), ("loss_dice", ref_dice), ("loss_bce", ref_bce),
                        ("loss_sup", ref_dice + beta * ref_sdf)):
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    assert not ours["loss_bce"].requires_grad
    ref_grads = torch.autograd.grad(ref_dice + beta * ref_sdf, (sdf, seg))
    grads = torch.autograd.grad(ours["loss_sup"], (sdf, seg))
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)
    # Whole-batch outputs (labeled first) and the caller's sigmoid: the same terms.
    extra = torch.randn(1, *sdf.shape[1:], generator=gen)
    whole_sdf, whole_seg = torch.cat([sdf, extra]), torch.cat([seg, extra])
    whole = sdf_supervised_loss(whole_sdf, whole_seg, labels, beta, torch.sigmoid(whole_seg))
    for name in ours:
        assert torch.equal(whole[name], ours[name]), name
    # the Dice alone, on probabilities
    probs = torch.rand(2, 5, 6, generator=gen)
    target = torch.rand(2, 5, 6, generator=gen) > 0.5
    assert torch.equal(binary_dice_loss(probs, target), losses.dice_loss(probs, target))
    assert F.mse_loss(sdf[:, 0], gt).item() == ref_sdf.item()
