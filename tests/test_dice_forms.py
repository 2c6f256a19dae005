"""Each method's supervised Dice has the form of the reference it follows, and MC-Net+'s
decoders are in the reference's order with its interpolation settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agcl.methods.dice import masked_dice_loss, soft_dice_loss
from agcl.methods.losses import supervised_loss
from agcl.methods.registry import get_method
from agcl.nets import build

# Two classes, three voxels, one image: logits chosen so that softmax gives these p.
P_FG = torch.tensor([0.9, 0.2, 0.6])
TARGET = torch.tensor([[1, 0, 1]])


def logits_for(p_fg: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(p_fg), torch.log(p_fg / (1 - p_fg))])[None]


def by_hand(form: str, p: torch.Tensor, t: torch.Tensor) -> float:
    inter, psum, p2, tsum = float((p * t).sum()), float(p.sum()), float((p * p).sum()), float(t.sum())
    if form == "squared":
        return 1 - (2 * inter + 1e-5) / (p2 + tsum + 1e-5)
    if form == "linear":
        return 1 - (2 * inter + 1e-8) / (psum + tsum + 1e-8)
    return 1 - inter / (p2 + tsum + 1e-10)


@pytest.mark.parametrize("form", ["squared", "linear", "mcnet2d"])
def test_dice_forms_by_hand(form):
    fg = by_hand(form, P_FG, TARGET[0].float())
    bg = by_hand(form, 1 - P_FG, 1 - TARGET[0].float())
    logits = logits_for(P_FG)
    assert float(soft_dice_loss(logits, TARGET, False, form)) == pytest.approx(fg, rel=1e-5)
    assert float(soft_dice_loss(logits, TARGET, True, form)) == pytest.approx((fg + bg) / 2,
                                                                               rel=1e-5)


def test_forms_really_differ_and_bad_form_is_named():
    logits = logits_for(P_FG)
    values = {f: float(soft_dice_loss(logits, TARGET, False, f))
              for f in ("squared", "linear", "mcnet2d")}
    assert len({round(v, 6) for v in values.values()}) == 3
    with pytest.raises(ValueError, match="dice_form: expected one of squared, linear, mcnet2d"):
        soft_dice_loss(logits, TARGET, False, "cubic")
    sup = supervised_loss(logits, TARGET, False, "linear")
    ce = float(nn.functional.cross_entropy(logits, TARGET))
    assert float(sup["loss_sup"]) == pytest.approx(0.5 * (ce + values["linear"]))


@pytest.mark.parametrize("method,dataset,form", [
    ("supervised", "la", "squared"), ("mean_teacher", "la", "squared"),  # UA-MT dice_loss
    ("ua_mt", "acdc", "squared"),  # SSL4MIS DiceLoss
    ("mc_net", "la", "linear"),  # MC-Net Binary_dice_loss
    ("mc_net", "acdc", "mcnet2d"),  # MC-Net 2D DiceLoss
])
def test_each_method_uses_its_references_dice(method, dataset, form):
    assert get_method(method).hparams_for(dataset)["dice_form"] == form


def test_mcnet2d_first_decoder_is_bilinear_and_is_the_one_tested():
    torch.manual_seed(0)
    net = build("mcnet2d", 1, 4, base_features=2).eval()
    modes = [[m.mode for m in d.modules() if isinstance(m, nn.Upsample)] for d in net.decoders]
    assert modes[0] and set(modes[0]) == {"bilinear"}
    assert not modes[1] and any(isinstance(m, nn.ConvTranspose2d) for m in net.decoders[1].modules())
    assert set(modes[2]) == {"nearest"}
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net.forward_all(x)[0])


def test_mcnet3d_trilinear_decoder_aligns_corners():
    net = build("mcnet3d", 1, 2, n_filters=2)
    ups = [m for m in net.decoders[1].modules() if isinstance(m, nn.Upsample)]
    assert ups and all(m.mode == "trilinear" and m.align_corners is True for m in ups)
    assert any(isinstance(m, nn.ConvTranspose3d) for m in net.decoders[0].modules())
    assert math.isclose(sum(p.numel() for p in build("mcnet3d", 1, 2).parameters()), 15_246_566)


def test_the_masked_squared_form_is_unimatchs_dice_over_the_confident_pixels():
    """UniMatch's DiceLoss(ignore=...) (util/utils.py:27-50): per class over the kept pixels,
    squared denominator, smooth 1e-5, every class averaged; with nothing ignored it is the
    unmasked SSL4MIS form."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=gen)
    target = torch.randint(0, 3, (2, 5, 4), generator=gen)
    keep = torch.rand(2, 1, 5, 4, generator=gen) < 0.6
    probs = logits.softmax(1)
    assert float(masked_dice_loss(probs, target, "squared")) == pytest.approx(
        float(soft_dice_loss(logits, target, True, "squared")), rel=1e-6)
    expected = 0.0
    for c in range(3):
        p, t = probs[:, c][keep[:, 0]], (target == c).float()[keep[:, 0]]
        expected += 1 - (2 * float((p * t).sum()) + 1e-5) / (
            float((p * p).sum()) + float((t * t).sum()) + 1e-5)
    got = float(masked_dice_loss(probs, target, "squared", keep))
    assert got == pytest.approx(expected / 3, rel=1e-6)
    # its smooth is 1e-5, not BCP's 1e-10: one kept pixel of class 0 predicted at p 0.998
    one = torch.tensor([0.998, 0.001, 0.001]).view(1, 3, 1, 1)
    absent = 1 - 1e-5 / (1e-6 + 1e-5)  # classes 1 and 2: smooth / (p^2 + smooth)
    assert float(masked_dice_loss(one, torch.zeros(1, 1, 1, dtype=torch.long), "squared")) == \
        pytest.approx(2 * absent / 3, rel=1e-3)
    assert float(masked_dice_loss(one, torch.zeros(1, 1, 1, dtype=torch.long),
                                  "batch_squared")) > 0.6


def test_abds_masked_form_scores_the_background_over_the_whole_image():
    """ABD's DiceLoss(mask=...) (code/utils/losses.py:169-196): classes >= 1 over the mask, the
    background over every pixel (its mask encoder's mask * 0 == 0 holds everywhere)."""
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 3, 6, 5, generator=gen).softmax(1)
    target = torch.randint(0, 3, (2, 6, 5), generator=gen)
    keep = (torch.rand(2, 1, 6, 5, generator=gen) < 0.5).float()
    weight = keep.repeat(1, 3, 1, 1)
    weight[:, 0] = 1.0
    onehot = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    expected = sum(
        1 - (2 * float((probs[:, c] * onehot[:, c] * weight[:, c]).sum()) + 1e-10)
        / (float((probs[:, c] ** 2 * weight[:, c]).sum() + (onehot[:, c] * weight[:, c]).sum())
           + 1e-10) for c in range(3)) / 3
    got = float(masked_dice_loss(probs, target, "batch_squared_bg_whole", keep))
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(float(masked_dice_loss(probs, target, "batch_squared", keep)),
                                rel=1e-3)  # BCP's masks the background too
