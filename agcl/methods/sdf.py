"""Signed distance maps of label masks and the supervised loss of a signed-distance V-Net
(agcl.nets.vnet_sdf), shared by DTC and SASSNet.

compute_sdf is HiLab-git/DTC code/utils/util.py:123-150 compute_sdf, which kleinzcy/SASSnet
code/utils/util.py:123-150 repeats line for line (and HiLab-git/SSL4MIS code/utils/util.py:205-236
too): per sample, with foreground F,

    sdf = norm(edt(~F)) - norm(edt(F)),   norm(d) = (d - min d) / (max d - min d),

set to 0 on F's inner boundary; 0 everywhere for a sample without foreground. The reference finds
the boundary with skimage.segmentation.find_boundaries(F, mode='inner'): the foreground voxels
whose 2*ndim face neighbours (skimage's reflecting border: none outside the array) hold
background, i.e. F and not binary_erosion(F) with the face-connected structure and border_value 1.
Here scipy.ndimage alone computes it (tested equal to the reference's own function).

A sample whose crop is all foreground has edt(~F) = 0 everywhere, so the reference divides 0 by 0:
its map is NaN, and so is ours (a NaN loss, which the engine's non-finite policy skips or stops
on). A random 112x112x80 LA crop is never all atrium.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from agcl.methods.hparams import HParam


def _unit_range(distance: np.ndarray) -> np.ndarray:
    low = np.min(distance)
    return (distance - low) / (np.max(distance) - low)


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour inside the array (find_boundaries
    mode='inner', connectivity 1)."""
    faces = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=faces, border_value=1)


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """The normalised signed distance map of one binary mask (float64, mask's shape): negative
    inside, positive outside, 0 on the inner boundary; zeros when the mask is empty."""
    foreground = np.asarray(mask, dtype=bool)
    if not foreground.any():
        return np.zeros(foreground.shape)
    sdf = (_unit_range(ndimage.distance_transform_edt(~foreground))
           - _unit_range(ndimage.distance_transform_edt(foreground)))
    sdf[inner_boundary(foreground)] = 0
    return sdf


def compute_sdf(labels: np.ndarray) -> np.ndarray:
    """signed_distance_map of each sample of `labels` (B, *spatial), foreground = nonzero."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape)
    for b, label in enumerate(labels):
        out[b] = signed_distance_map(label != 0)
    return out


@torch.no_grad()
def sdf_target(labels: torch.Tensor) -> torch.Tensor:
    """compute_sdf of int class ids (B, *spatial) as float32 on their device
    (train_la_dtc.py:176-179: computed on the host, `.float().cuda()`)."""
    return torch.from_numpy(compute_sdf(labels.cpu().numpy())).float().to(labels.device)


def binary_dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DTC utils/losses.py:8-16 (SASSnet utils/losses.py:7-15) dice_loss over the whole batch:
    1 - (2 sum(p t) + 1e-5) / (sum p^2 + sum t^2 + 1e-5), p the sigmoid foreground probability,
    t the binary target."""
    target = target.float()
    intersection = (probs * target).sum()
    return 1.0 - (2 * intersection + 1e-5) / ((probs * probs).sum() + (target * target).sum()
                                              + 1e-5)


SDF_SUPERVISED_HPARAMS = {
    "beta": HParam(0.3, "--beta 0.3: supervised loss = Dice + beta * MSE(sdf) "
                   "(train_la_dtc.py:50,188; SASSnet train_gan_sdfloss.py:42,170)", low=0.0),
}


def sdf_supervised_loss(sdf: torch.Tensor, foreground_logits: torch.Tensor,
                        labels: torch.Tensor, beta: float,
                        probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Dice of sigmoid(z) + beta * MSE(tanh sdf, sdf of the labels) on the first len(labels)
    samples of the outputs (B, 1, ...), labeled first, against their int labels (Bl, ...)
    (train_la_dtc.py:173-188, SASSnet train_gan_sdfloss.py:158-170).

    `probs`: sigmoid(foreground_logits) of the whole batch where the caller computes it anyway
    (the references' outputs_soft, shared with their consistency terms): then the backward graph
    is theirs and the gradients equal bit for bit. The BCE term the references compute but never
    add (train_la_dtc.py:181-182) is returned as `loss_bce`, detached, for the logs.
    """
    n = labels.shape[0]
    if probs is None:
        probs = torch.sigmoid(foreground_logits[:n].float())
    loss_sdf = F.mse_loss(sdf[:n, 0].float(), sdf_target(labels))
    with torch.no_grad():
        loss_bce = F.binary_cross_entropy_with_logits(foreground_logits[:n, 0].float(),
                                                      labels.float())
    loss_dice = binary_dice_loss(probs[:n, 0].float(), labels == 1)
    return {"loss_dice": loss_dice, "loss_sdf": loss_sdf, "loss_bce": loss_bce,
            "loss_sup": loss_dice + beta * loss_sdf}
