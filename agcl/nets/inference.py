"""Whole-case inference: sliding windows (LA, CRAG) and per-slice prediction (ACDC).

Shared by validation during training and by `agcl evaluate`, so both see the same protocol.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import torch
from torch import nn

from agcl.common.imaging import resize_nearest


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Reference positions: ceil((size - patch) / stride) + 1 windows, the last clamped to the edge."""
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


def eval_window(eval_cfg: dict, train_patch: list[int]) -> tuple[list[int], list[int]]:
    """Window size and stride of validation and test: eval.patch (else the training patch) and
    eval.stride (else one patch, i.e. no overlap)."""
    patch = eval_cfg.get("patch", train_patch)
    return patch, eval_cfg.get("stride", patch)


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@torch.no_grad()
def sliding_window_probabilities(net: nn.Module, image: np.ndarray, patch: list[int],
                                 stride: list[int], num_classes: int, device: torch.device,
                                 window_batch: int = 4,
                                 amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Softmax averaged over overlapping windows; image (C, *spatial) -> (K, *spatial).

    As the references: pad (centred, zeros) to at least one patch, visit the reference window
    positions, sum softmax outputs and divide by the per-voxel window count. Windows are batched
    (`window_batch`) so a GPU gets several at once.
    """
    spatial = image.shape[1:]
    pads = [max(0, p - s) for p, s in zip(patch, spatial)]
    widths = [(pad // 2, pad - pad // 2) for pad in pads]
    padded = np.pad(image, [(0, 0), *widths]) if any(pads) else image
    padded_spatial = padded.shape[1:]
    starts = [window_starts(s, p, st) for s, p, st in zip(padded_spatial, patch, stride)]
    corners = list(itertools.product(*starts))
    volume = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    scores = torch.zeros((num_classes, *padded_spatial), dtype=torch.float32)
    counts = torch.zeros(padded_spatial, dtype=torch.float32)
    for first in range(0, len(corners), window_batch):
        group = corners[first:first + window_batch]
        regions = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in group]
        windows = torch.stack([volume[(slice(None), *r)] for r in regions]).to(device)
        with autocast_context(device, amp_dtype):
            logits = net(windows)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        for region, prob in zip(regions, probs):
            scores[(slice(None), *region)] += prob
            counts[region] += 1
    scores /= counts
    crop = tuple(slice(w[0], w[0] + s) for w, s in zip(widths, spatial))
    return scores[(slice(None), *crop)].numpy()


@torch.no_grad()
def predict_slices(net: nn.Module, volume: np.ndarray, size: list[int], device: torch.device,
                   batch: int = 16, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """ACDC protocol: each slice resized (nearest) to `size`, argmax, resized back (nearest).

    volume (1, S, H, W) -> labels (S, H, W).
    """
    _, depth, height, width = volume.shape
    resized = resize_nearest(volume[0], tuple(size)).astype(np.float32)
    labels = np.empty((depth, *size), dtype=np.uint8)
    for first in range(0, depth, batch):
        chunk = torch.from_numpy(resized[first:first + batch, None]).to(device)
        with autocast_context(device, amp_dtype):
            logits = net(chunk)
        labels[first:first + batch] = logits.float().argmax(dim=1).cpu().numpy()
    return resize_nearest(labels, (height, width))


def predict_case(net: nn.Module, image: np.ndarray, eval_mode: str, num_classes: int,
                 patch: list[int], stride: list[int], device: torch.device, window_batch: int = 4,
                 amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Label map of one case under the dataset's protocol (see DatasetSpec.eval_mode)."""
    was_training = net.training
    net.eval()
    try:
        if eval_mode == "slices_2d":
            return predict_slices(net, image, patch[-2:], device, amp_dtype=amp_dtype)
        probs = sliding_window_probabilities(net, image, patch, stride, num_classes, device,
                                             window_batch, amp_dtype)
        return probs.argmax(axis=0).astype(np.uint8)
    finally:
        net.train(was_training)


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Plain Dice per foreground class for validation (1 when both are empty)."""
    out = []
    for k in range(1, num_classes):
        p, g = pred == k, label == k
        denom = p.sum() + g.sum()
        out.append(1.0 if denom == 0 else float(2 * np.logical_and(p, g).sum() / denom))
    return out
