"""Every soft Dice loss the references use, under one vocabulary (hparam `dice_form`); each
method allows the forms of the reference it follows.

Unmasked, per class over the batch and the voxels (soft_dice_loss, from logits):
  squared:  UA-MT losses.dice_loss, SSL4MIS DiceLoss   1 - (2I + 1e-5) / (sum p^2 + sum t^2 + 1e-5)
  linear:   MC-Net 3D Binary_dice_loss                 1 - (2I + 1e-8) / (sum p + sum t + 1e-8)
  mcnet2d:  MC-Net 2D DiceLoss (no factor 2)            1 - I / (sum p^2 + sum t^2 + 1e-10)
Over a region mask (masked_dice_loss, from probabilities; BCP's two and UniMatch's):
  per_sample_linear: BCP LA mask_DiceLoss, per sample and class, linear denominator, smooth 1e-5
  batch_squared:     BCP ACDC DiceLoss, per class over the batch, squared denominator, smooth 1e-10
  squared:           UniMatch medical DiceLoss(ignore=...) (util/utils.py:27-50), per class over
                     the batch, squared denominator, smooth 1e-5 in both (SSL4MIS's, masked)
  batch_squared_bg_whole: ABD's DiceLoss with a mask (code/utils/losses.py:169-175, 187-196):
                     batch_squared, but the background class over the whole image, since its
                     mask encoder (mask * i == i) holds everywhere for i = 0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNMASKED_FORMS = ("squared", "linear", "mcnet2d")
MASKED_FORMS = ("per_sample_linear", "batch_squared", "squared", "batch_squared_bg_whole")
DICE_FORMS = UNMASKED_FORMS + MASKED_FORMS


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool,
                   form: str = "squared") -> torch.Tensor:
    """1 - mean soft Dice over classes (softmax probabilities vs one-hot target).

    `include_background`: UA-MT and MC-Net 3D score the foreground class only, SSL4MIS and MC-Net
    2D average over every class including background. `form`: one of UNMASKED_FORMS.
    """
    if form not in UNMASKED_FORMS:
        raise ValueError(f"dice_form: expected one of {', '.join(UNMASKED_FORMS)}, got {form!r}")
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).float()
    dims = (0, *range(2, logits.ndim))
    intersection = (probs * onehot).sum(dim=dims)
    if form == "linear":
        dice = (2 * intersection + 1e-8) / (probs.sum(dim=dims) + onehot.sum(dim=dims) + 1e-8)
    else:
        squares = (probs * probs).sum(dim=dims) + onehot.sum(dim=dims)  # t^2 = t for one-hot
        dice = ((2 * intersection + 1e-5) / (squares + 1e-5) if form == "squared"
                else intersection / (squares + 1e-10))
    first = 0 if include_background else 1
    return 1.0 - dice[first:].mean()


def _onehot_and_weight(probs, target, mask):
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    weight = torch.ones_like(probs[:, :1]) if mask is None else mask.to(probs.dtype)
    return onehot, weight


def dice_per_sample_linear(probs: torch.Tensor, target: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCP's LA mask_DiceLoss: 1 - mean over samples and classes of
    (2 sum(p t m) + 1e-5) / (sum((p + t) m) + 1e-5)."""
    n, k = probs.shape[:2]
    onehot, weight = _onehot_and_weight(probs, target, mask)
    inter = (probs * onehot * weight).reshape(n, k, -1).sum(2)
    union = ((probs + onehot) * weight).reshape(n, k, -1).sum(2)
    return 1.0 - ((2 * inter + 1e-5) / (union + 1e-5)).mean()


def dice_batch_squared(probs: torch.Tensor, target: torch.Tensor,
                       mask: torch.Tensor | None = None, smooth: float = 1e-10) -> torch.Tensor:
    """BCP's ACDC DiceLoss: mean over classes of 1 - (2 sum(p t m) + smooth) /
    (sum(p^2 m) + sum(t^2 m) + smooth), sums over the whole batch (smooth 1e-10; UniMatch's
    masked DiceLoss is the same with 1e-5)."""
    onehot, weight = _onehot_and_weight(probs, target, mask)
    return _batch_squared(probs, onehot, weight, smooth)


def _batch_squared(probs, onehot, weight, smooth: float) -> torch.Tensor:
    dims = (0, *range(2, probs.ndim))
    inter = (probs * onehot * weight).sum(dims)
    denominator = (probs * probs * weight).sum(dims) + (onehot * weight).sum(dims)
    return (1.0 - (2 * inter + smooth) / (denominator + smooth)).mean()


def dice_squared(probs: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """UniMatch's DiceLoss with `ignore` (the voxels where mask is 0): smooth 1e-5."""
    return dice_batch_squared(probs, target, mask, smooth=1e-5)


def dice_batch_squared_bg_whole(probs: torch.Tensor, target: torch.Tensor,
                                mask: torch.Tensor | None = None) -> torch.Tensor:
    """ABD's masked DiceLoss: BCP's batch_squared form, the background class unmasked."""
    onehot, weight = _onehot_and_weight(probs, target, mask)
    weight = weight.expand_as(probs).clone()
    weight[:, 0] = 1.0
    return _batch_squared(probs, onehot, weight, 1e-10)


_MASKED = {"per_sample_linear": dice_per_sample_linear, "batch_squared": dice_batch_squared,
           "squared": dice_squared, "batch_squared_bg_whole": dice_batch_squared_bg_whole}


def masked_dice_loss(probs: torch.Tensor, target: torch.Tensor, form: str,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dice loss of softmax `probs` against `target` over the voxels where `mask` (B, 1, ...)
    is 1 (None: all), in one of MASKED_FORMS; every class is scored."""
    if form not in _MASKED:
        raise ValueError(f"dice_form: expected one of {', '.join(MASKED_FORMS)}, got {form!r}")
    return _MASKED[form](probs, target, mask)
