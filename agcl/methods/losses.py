"""Loss pieces shared by several methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The references' Dice losses differ in form; each method names the one of the reference it
# follows (hparam dice_form). Sums run over the batch and the voxels, per class.
#   squared: UA-MT losses.dice_loss, SSL4MIS DiceLoss   1 - (2I + 1e-5) / (sum p^2 + sum t^2 + 1e-5)
#   linear:  MC-Net 3D Binary_dice_loss                 1 - (2I + 1e-8) / (sum p + sum t + 1e-8)
#   mcnet2d: MC-Net 2D DiceLoss (no factor 2)            1 - I / (sum p^2 + sum t^2 + 1e-10)
DICE_FORMS = ("squared", "linear", "mcnet2d")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool,
                   form: str = "squared") -> torch.Tensor:
    """1 - mean soft Dice over classes (softmax probabilities vs one-hot target).

    `include_background`: UA-MT and MC-Net 3D score the foreground class only, SSL4MIS and MC-Net
    2D average over every class including background. `form`: see DICE_FORMS.
    """
    if form not in DICE_FORMS:
        raise ValueError(f"dice_form: expected one of {', '.join(DICE_FORMS)}, got {form!r}")
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


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool,
                    form: str = "squared") -> dict:
    """0.5 x (CE + Dice), as UA-MT and SSL4MIS."""
    ce = F.cross_entropy(logits.float(), target.long())
    dice = soft_dice_loss(logits, target, include_background, form)
    return {"loss_ce": ce, "loss_dice": dice, "loss_sup": 0.5 * (ce + dice)}


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t/L)^2), clipped to [0, 1]; 1 when L == 0 (Laine & Aila, used by all references)."""
    if rampup_length == 0:
        return 1.0
    t = min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-element (softmax(student) - softmax(teacher))^2 in float32, shape of the logits.

    Left unreduced because the references reduce it differently: Mean Teacher averages it,
    UA-MT sums it under an uncertainty mask.
    """
    student = torch.softmax(student_logits.float(), dim=1)
    teacher = torch.softmax(teacher_logits.float(), dim=1)
    return (student - teacher) ** 2


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) / (p^(1/T) + (1 - p)^(1/T)) per element (MC-Net+), not renormalised over classes."""
    power = 1.0 / temperature
    high = probs**power
    return high / (high + (1.0 - probs) ** power)
