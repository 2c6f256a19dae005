"""Augmentations a method applies to a batch on its device (strong views, CutMix): per-sample
photometric transforms and CutMix boxes, each drawing from a torch.Generator the method passes
(`self.streams.torch("my_purpose", x.device)`), so that the draws are the method's own and a
resume replays them.

Images are (B, C, *spatial), 2D or 3D, in the dataset's processed intensities (docs/data.md):
ACDC in [0, 1] per volume, LA z-scored per volume, CRAG per-channel stain-normalised. The
photometric transforms follow torchvision's ColorJitter brightness / contrast and PIL's
Gaussian blur as UniMatch's medical dataloader applies them to [0, 1] slices; on z-scored data
they act on the same scale without clamping (clamp=None).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["brightness_contrast", "cutmix_boxes", "gaussian_blur", "mix"]


def _uniform(n: int, low: float, high: float, generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _chosen(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Which samples a transform of probability `p` applies to (one draw per sample)."""
    return torch.rand(n, generator=generator, device=device) < p


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def brightness_contrast(x: torch.Tensor, generator: torch.Generator, *, brightness: float = 0.5,
                        contrast: float = 0.5, p: float = 0.8,
                        clamp: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """ColorJitter's brightness then contrast, on a random subset of samples (probability p):
    brightness multiplies by a factor in [1 - b, 1 + b]; contrast blends with the sample's mean
    by a factor in [1 - c, 1 + c]; each result clamped to `clamp` (None: not clamped)."""
    n, device = x.shape[0], x.device
    chosen = _chosen(n, p, generator, device)
    b = _uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator, device)
    c = _uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator, device)

    def bounded(t):
        return t.clamp(*clamp) if clamp is not None else t

    out = bounded(x * _per_sample(b, x))
    mean = out.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    c = _per_sample(c, x)
    out = bounded(c * out + (1 - c) * mean)
    return torch.where(_per_sample(chosen, x).bool(), out, x)


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, *,
                  sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> torch.Tensor:
    """A separable Gaussian blur with a sigma drawn per sample in `sigma`, on a random subset of
    samples (probability p); borders replicate the edge (each axis keeps its size)."""
    n, device = x.shape[0], x.device
    chosen = _chosen(n, p, generator, device)
    sigmas = _uniform(n, *sigma, generator, device).tolist()
    out = x.clone()
    spatial = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    for i in torch.nonzero(chosen).flatten().tolist():
        sample = x[i:i + 1]
        kernel = _gaussian_kernel(sigmas[i], x.dtype, device)
        channels = sample.shape[1]
        for axis in range(spatial):
            shape = [1] * spatial
            shape[axis] = kernel.numel()
            weight = kernel.view(1, 1, *shape).repeat(channels, 1, *[1] * spatial)
            pad = [0, 0] * spatial
            pad[2 * (spatial - 1 - axis)] = pad[2 * (spatial - 1 - axis) + 1] = kernel.numel() // 2
            sample = conv(F.pad(sample, pad, mode="replicate"), weight, groups=channels)
        out[i:i + 1] = sample
    return out


def cutmix_boxes(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, *,
                 p: float = 0.5, size: tuple[float, float] = (0.02, 0.4),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """One box mask per sample, (B, *spatial) of 0/1 (int64), as UniMatch's obtain_cutmix_box:
    with probability p a box of area fraction in `size` and aspect ratio in `ratio` (first two
    spatial axes; a third axis, 3D, spans the box's mean side fraction), else no box (zeros)."""
    n, spatial = shape[0], shape[1:]
    masks = torch.zeros((n, *spatial), dtype=torch.long, device=device)
    # one host read of all draws: (chosen, area, aspect, three start fractions) per sample
    draws = torch.rand((n, 6), generator=generator, device=generator.device).tolist()
    for i in range(n):
        if draws[i][0] >= p:
            continue
        draws[i] = draws[i][1:]
        area = (size[0] + (size[1] - size[0]) * draws[i][0]) * math.prod(spatial)
        aspect = ratio[0] + (ratio[1] - ratio[0]) * draws[i][1]
        sides = [int(math.sqrt(area / aspect)), int(math.sqrt(area * aspect))]
        if len(spatial) == 3:  # a cube-like box: the third side at the mean fraction of the two
            sides.append(int(spatial[2] * (sides[0] / spatial[0] + sides[1] / spatial[1]) / 2))
        sides = [max(1, min(s, full)) for s, full in zip(sides, spatial)]
        starts = [int(d * (full - s + 1)) for d, s, full in zip(draws[i][2:], sides, spatial)]
        region = tuple(slice(st, st + s) for st, s in zip(starts, sides))
        masks[(i, *region)] = 1
    return masks


def mix(x: torch.Tensor, source: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """`x` with the box region (cutmix_boxes' mask) taken from `source`, sample by sample; works
    for images (B, C, *spatial) and label maps (B, *spatial)."""
    mask = box.bool()
    if x.dim() == box.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, source, x)
