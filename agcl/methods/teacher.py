"""Mean Teacher (Tarvainen & Valpola 2017) as UA-MT (LA) and SSL4MIS (ACDC) train it: the
mechanism that baselines/mean_teacher.py registers and baselines/ua_mt.py extends.

The student sees the labeled and unlabeled images in one forward pass; an EMA copy of it (the
teacher, under no_grad) sees the unlabeled images plus clipped Gaussian noise. Loss =
0.5 (CE + Dice) on the labeled part + w(t) * softmax-MSE(student, teacher) on the unlabeled part.
The teacher stays in train mode with the rest of the method, so its dropout is on, as upstream.
"""

from __future__ import annotations

import torch

from agcl.methods.base import Batch, HParam, Method, require_unlabeled
from agcl.methods.ema import ema_update, make_ema_teacher
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, softmax_mse, supervised_loss
from agcl.methods.ramps import epoch_rampup


def teacher_noise(x: torch.Tensor, std: float, clip: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """clamp(N(0, std), -clip, clip), the same shape as x (UA-MT / SSL4MIS teacher input noise),
    drawn from `generator` (on x's device; None: the global RNG)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.clamp(noise * std, -clip, clip)


def consistency_weight(hparams: dict, step: int) -> float:
    """c * exp(-5 (1 - t/L)^2) with t = step // 150: the references ramp on 150-iteration 'epochs';
    0 before `consistency_start` where a method declares it (SSL4MIS's 2D Mean Teacher)."""
    if step < hparams.get("consistency_start", 0):
        return 0.0
    return hparams["consistency"] * epoch_rampup(step, hparams["rampup_epoch_iterations"],
                                                 hparams["consistency_rampup"])


class MeanTeacherBase(Method):
    hyperparameters = {
        **SUPERVISED_LOSS_HPARAMS,
        "ema_decay": HParam(0.99, "UA-MT train_LA.py / SSL4MIS --ema_decay 0.99", low=0.0, high=1.0),
        "noise_std": HParam(0.1, "teacher input noise randn * 0.1 (UA-MT, SSL4MIS)", low=0.0),
        "noise_clip": HParam(0.2, "... clamped to [-0.2, 0.2] (UA-MT, SSL4MIS)", low=0.0),
        "consistency": HParam(0.1, "--consistency 0.1 (UA-MT LA, SSL4MIS ACDC)", low=0.0),
        "consistency_rampup": HParam(40.0, "--consistency_rampup 40 (UA-MT LA), in 150-iteration "
                                     "epochs", low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num // 150), "
                                          "all refs", low=1),
    }
    dataset_defaults = {
        # SSL4MIS 2D: --consistency_rampup 200 (CRAG, which no reference ships, takes it too)
        "2d": {"consistency_rampup": 200.0},
        # its DiceLoss averages every class incl. background on ACDC's multi-class labels; a
        # binary set keeps the supervised baseline's Dice scope
        "multiclass": {"dice_include_background": True},
    }

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        self.teacher = make_ema_teacher(self.student)

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        return x + teacher_noise(x, self.hparams["noise_std"], self.hparams["noise_clip"],
                                 self.streams.torch("teacher_noise", x.device))

    def consistency(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    x_unlabeled: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Unsupervised term on the unlabeled part; UA-MT overrides this to mask it."""
        return softmax_mse(student_logits, teacher_logits).mean(), {}

    def train_step(self, batch: Batch, step: int):
        x_unlabeled = require_unlabeled(batch, self.name)
        n_labeled = batch.x_labeled.shape[0]
        logits = self.student(torch.cat([batch.x_labeled, x_unlabeled]))
        losses = supervised_loss(logits[:n_labeled], batch.y_labeled,
                                 self.hparams["dice_include_background"], self.hparams["dice_form"])
        with torch.no_grad():
            teacher_logits = self.teacher(self.noisy(x_unlabeled))
        loss_cons, extra = self.consistency(logits[n_labeled:], teacher_logits, x_unlabeled, step)
        weight = consistency_weight(self.hparams, step)
        loss = losses["loss_sup"] + weight * loss_cons
        logs = {k: v.detach() for k, v in losses.items()}
        logs.update(loss_cons=loss_cons.detach(), cons_weight=weight, **extra)
        return loss, logs

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.hparams["ema_decay"], step)
