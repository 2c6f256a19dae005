"""Loss pieces shared by several methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool) -> torch.Tensor:
    """1 - mean soft Dice over classes (softmax probabilities vs one-hot target).

    The references differ: UA-MT (LA) scores the foreground class only, SSL4MIS (ACDC) averages
    over every class including background; `include_background` picks one.
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).float()
    dims = tuple(range(2, logits.ndim))
    intersection = (probs * onehot).sum(dim=(0, *dims))
    denominator = probs.sum(dim=(0, *dims)) + onehot.sum(dim=(0, *dims))
    dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
    first = 0 if include_background else 1
    return 1.0 - dice[first:].mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool) -> dict:
    """0.5 x (CE + Dice), as UA-MT, SSL4MIS and BCP."""
    ce = F.cross_entropy(logits.float(), target.long())
    dice = soft_dice_loss(logits, target, include_background)
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
