"""Mean Teacher (Tarvainen & Valpola 2017) as UA-MT (LA) and SSL4MIS (ACDC) train it.

The student sees the labeled and unlabeled images in one forward pass; an EMA copy of it (the
teacher, under no_grad) sees the unlabeled images plus clipped Gaussian noise. Loss =
0.5 (CE + Dice) on the labeled part + w(t) * softmax-MSE(student, teacher) on the unlabeled part.
The mechanism and its hyperparameters live in agcl.methods.teacher, which UA-MT extends too.
"""

from __future__ import annotations

from agcl.methods import HParam, register_method
from agcl.methods.teacher import MeanTeacherBase


@register_method("mean_teacher")
class MeanTeacher(MeanTeacherBase):
    """Mean Teacher with a warm-up EMA teacher and a softmax-MSE consistency."""

    hyperparameters = {
        **MeanTeacherBase.hyperparameters,
        # SSL4MIS's 2D script sets the consistency to 0.0 while iter_num < 1000
        # (train_mean_teacher_2D.py:170-174); UA-MT's LA script has no such start. 0 (no silent
        # start) in the unified protocol; config/reference.yaml sets 1000 on ACDC.
        "consistency_start": HParam(0, "steps before the consistency term counts (SSL4MIS 2D: "
                                    "1000)", low=0),
    }
