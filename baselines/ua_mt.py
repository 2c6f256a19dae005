"""Uncertainty-aware Mean Teacher (Yu et al., MICCAI 2019), as UA-MT (LA) and SSL4MIS (ACDC).

Mean Teacher whose consistency only counts voxels where the teacher is certain: T noisy
stochastic teacher passes (dropout on), predictive entropy of their mean softmax, and a threshold
rising from (0.75 + 0.25 e^-5) ln 2 to ln 2 over training (ln 2 for every class count, as upstream).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from agcl.methods import HParam, register_method
from agcl.methods.losses import softmax_mse
from agcl.methods.ramps import sigmoid_rampup
from agcl.methods.teacher import MeanTeacherBase, teacher_noise


def uncertainty_threshold(step: int, total_iterations: int, floor: float = 0.75,
                          ceiling: float = math.log(2)) -> float:
    """(floor + (1 - floor) * rampup(step, total)) * ceiling; UA-MT ramps over the whole run."""
    return (floor + (1.0 - floor) * sigmoid_rampup(step, total_iterations)) * ceiling


@torch.no_grad()
def mean_teacher_probs(teacher: nn.Module, x: torch.Tensor, passes: int, passes_per_forward: int,
                       noise_std: float, noise_clip: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean softmax over `passes` noisy forward passes, `passes_per_forward` batched at once.

    The input is repeated pass-major ([x0, x1, x0, x1, ...]) so that each chunk of the output
    reshapes to (passes_per_forward, B, C, ...), as the references' repeat-and-reshape.
    """
    if passes % passes_per_forward:
        raise ValueError(f"ua_mt: uncertainty_passes ({passes}) must be a multiple of "
                         f"passes_per_forward ({passes_per_forward})")
    repeated = x.repeat(passes_per_forward, *([1] * (x.ndim - 1)))
    total = None
    for _ in range(passes // passes_per_forward):
        logits = teacher(repeated + teacher_noise(repeated, noise_std, noise_clip, generator))
        probs = torch.softmax(logits.float(), dim=1)
        chunk = probs.view(passes_per_forward, x.shape[0], *probs.shape[1:]).sum(dim=0)
        total = chunk if total is None else total + chunk
    return total / passes


def certainty_mask(mean_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where the predictive entropy -sum p log(p + 1e-6) is below threshold, (B, 1, ...)."""
    entropy = -(mean_probs * torch.log(mean_probs + 1e-6)).sum(dim=1, keepdim=True)
    return (entropy < threshold).float()


def masked_mse(distance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(mask * d) / (2 sum(mask) + 1e-16): UA-MT's constant 2 is kept for any class count."""
    return (mask * distance).sum() / (2.0 * mask.sum() + 1e-16)


@register_method("ua_mt")
class UaMt(MeanTeacherBase):
    hyperparameters = {
        **MeanTeacherBase.hyperparameters,
        "uncertainty_passes": HParam(8, "T = 8 stochastic teacher passes (UA-MT, SSL4MIS)", low=1),
        # Upstream runs 2 passes per forward (4 forwards); 8 = one batched forward. Only the
        # teacher's BatchNorm batch statistics differ (same images, so nearly equal).
        "passes_per_forward": HParam(8, "teacher passes batched in one forward", low=1),
        "threshold_floor": HParam(0.75, "threshold = (0.75 + 0.25 * ramp(iter, max_iter)) ... "
                                  "(UA-MT)", low=0.0, high=1.0),
        "threshold_ceiling": HParam(math.log(2), "... * ln 2, also for ACDC's 4 classes (SSL4MIS)",
                                    low=0.0),
    }

    def consistency(self, student_logits, teacher_logits, x_unlabeled, step):
        hp = self.hparams
        mean_probs = mean_teacher_probs(self.teacher, x_unlabeled, hp["uncertainty_passes"],
                                        hp["passes_per_forward"], hp["noise_std"],
                                        hp["noise_clip"],
                                        self.streams.torch("uncertainty_noise", x_unlabeled.device))
        threshold = uncertainty_threshold(step, self.total_iterations, hp["threshold_floor"],
                                          hp["threshold_ceiling"])
        mask = certainty_mask(mean_probs, threshold)
        loss = masked_mse(softmax_mse(student_logits, teacher_logits), mask)
        return loss, {"mask_fraction": mask.mean(), "uncertainty_threshold": threshold}
