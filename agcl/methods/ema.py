"""EMA teachers: one copy of a network that follows it by an exponential moving average."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int | None = None,
               buffers: bool = False) -> None:
    """teacher = a teacher + (1 - a) student over parameters.

    With `step` (UA-MT, SSL4MIS: the warm-up form) a = min(1 - 1/(step + 1), decay), so the
    teacher follows the student closely at first; without (BCP's update_ema_variables) a = decay.
    Parameters only, as the references, unless `buffers` (BCP's ACDC update_model_ema): then
    floating buffers are averaged too and the rest copied; otherwise the teacher's BatchNorm
    statistics come from its own forward passes in train mode.
    """
    alpha = decay if step is None else min(1.0 - 1.0 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    if buffers:
        for t, s in zip(teacher.buffers(), student.buffers()):
            if t.is_floating_point():
                t.mul_(alpha).add_(s, alpha=1.0 - alpha)
            else:
                t.copy_(s)
