"""Supervised baseline: labeled images only, 0.5 x (CE + Dice).

It is the lower bound at 5 / 10 % labels and, trained on 100 %, the upper bound row of the tables.
"""

from __future__ import annotations

from agcl.methods.base import Batch, Method
from agcl.methods.losses import supervised_loss
from agcl.methods.registry import register_method


@register_method("supervised")
class Supervised(Method):
    uses_unlabeled = False
    dataset_hparams = {"acdc": {"dice_include_background": True}}

    def train_step(self, batch: Batch, step: int):
        logits = self.student(batch.x_labeled)
        losses = supervised_loss(logits, batch.y_labeled, self.hparams["dice_include_background"],
                                 self.hparams["dice_form"])
        return losses["loss_sup"], {k: v.detach() for k, v in losses.items()}
