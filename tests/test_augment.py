"""The method-side augmentations: reproducible from the method's stream, per sample, shape- and
range-preserving, in 2D and 3D; CutMix boxes have the drawn area and aspect."""

from __future__ import annotations

import pytest
import torch

from agcl.methods.augment import brightness_contrast, cutmix_boxes, gaussian_blur, mix


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 8)])
def test_photometric_transforms_are_per_sample_reproducible_and_bounded(spatial):
    x = torch.rand(16, 1, *spatial)
    a = brightness_contrast(x, gen(), p=0.5)
    assert torch.equal(a, brightness_contrast(x, gen(), p=0.5))  # the stream decides
    assert not torch.equal(a, brightness_contrast(x, gen(1), p=0.5))
    changed = [not torch.equal(a[i], x[i]) for i in range(16)]
    assert 0 < sum(changed) < 16  # some samples drawn, some not
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert torch.equal(brightness_contrast(x, gen(), p=0.0), x)
    b = gaussian_blur(x, gen(), p=1.0)
    assert b.shape == x.shape and torch.equal(b, gaussian_blur(x, gen(), p=1.0))
    # a blur keeps the mean (replicated borders aside) and lowers the variance
    assert (b.var(dim=tuple(range(1, x.dim()))) < x.var(dim=tuple(range(1, x.dim())))).all()
    constant = torch.full_like(x, 0.3)
    assert torch.allclose(gaussian_blur(constant, gen(), p=1.0), constant, atol=1e-6)


def test_brightness_matches_torchvision_colorjitter_factors():
    # factor 1 +- 0.5 multiplies, then contrast blends with the mean: for a constant image the
    # contrast step changes nothing, so the result is the brightness factor times the value
    x = torch.full((64, 1, 8, 8), 0.4)
    out = brightness_contrast(x, gen(), p=1.0)
    factors = out[:, 0, 0, 0] / 0.4
    assert factors.min() >= 0.5 - 1e-6 and factors.max() <= 1.5 + 1e-6
    assert factors.std() > 0.2  # spread over the range, per sample


@pytest.mark.parametrize("spatial", [(64, 64), (32, 32, 16)])
def test_cutmix_boxes_have_the_drawn_size_and_mix_takes_the_box_from_the_source(spatial):
    boxes = cutmix_boxes((200, *spatial), gen(), torch.device("cpu"), p=0.5)
    assert boxes.shape == (200, *spatial) and set(boxes.unique().tolist()) <= {0, 1}
    with_box = boxes.flatten(1).sum(1) > 0
    assert 0.35 < with_box.float().mean() < 0.65
    area2d = boxes[with_box].flatten(1).sum(1).float() / boxes[0].numel()
    if len(spatial) == 2:
        assert area2d.min() >= 0.01 and area2d.max() <= 0.41
    assert torch.equal(boxes, cutmix_boxes((200, *spatial), gen(), torch.device("cpu"), p=0.5))
    x, source = torch.zeros(200, 1, *spatial), torch.ones(200, 1, *spatial)
    mixed = mix(x, source, boxes)
    assert torch.equal(mixed[:, 0], boxes.float())
    labels = mix(torch.zeros(200, *spatial, dtype=torch.long),
                 torch.full((200, *spatial), 2), boxes)
    assert torch.equal(labels, 2 * boxes)
