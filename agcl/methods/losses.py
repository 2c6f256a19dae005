"""Loss pieces shared by several methods (the Dice forms are in agcl.methods.dice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agcl.methods.dice import UNMASKED_FORMS, soft_dice_loss
from agcl.methods.hparams import HParam

# What supervised_loss reads: a method that calls it declares these (spread into its own
# `hyperparameters`), so only such methods accept them.
SUPERVISED_LOSS_HPARAMS = {
    # UA-MT scores only the foreground in its Dice loss (LA), SSL4MIS all classes (ACDC).
    "dice_include_background": HParam(False, "Dice over every class incl. background"),
    # UA-MT and SSL4MIS use squared denominators; MC-Net overrides it (agcl.methods.dice).
    "dice_form": HParam("squared", "the reference's Dice form", choices=UNMASKED_FORMS),
}


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool,
                    form: str = "squared") -> dict:
    """0.5 x (CE + Dice), as UA-MT and SSL4MIS."""
    ce = F.cross_entropy(logits.float(), target.long())
    dice = soft_dice_loss(logits, target, include_background, form)
    return {"loss_ce": ce, "loss_dice": dice, "loss_sup": 0.5 * (ce + dice)}


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
