"""Supervised baseline: labeled images only, 0.5 x (CE + Dice).

It is the lower bound at 5 / 10 % labels and, trained on 100 %, the upper bound row of the tables.
"""

from __future__ import annotations

from agcl.methods import Batch, Method, register_method
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, supervised_loss


@register_method("supervised")
class Supervised(Method):
    uses_unlabeled = False
    hyperparameters = SUPERVISED_LOSS_HPARAMS
    dataset_defaults = {"multiclass": {"dice_include_background": True}}

    def train_step(self, batch: Batch, step: int):
        logits = self.student(batch.x_labeled)
        losses = supervised_loss(logits, batch.y_labeled, self.hparams["dice_include_background"],
                                 self.hparams["dice_form"])
        return losses["loss_sup"], {k: v.detach() for k, v in losses.items()}
