"""MC-Net+ (Wu et al., MedIA 2022): mutual consistency between three decoders of one encoder.

Each decoder's softmax is pulled towards the sharpened softmax of every other decoder, on all
images of the batch (labeled and unlabeled); the labeled part also gets a Dice loss per decoder,
summed over decoders. Loss = lamda * sum_d Dice_d + w(t) * sum_{i != j} MSE(p_i, sharpen(p_j)).
Inference and validation use the first decoder, as MC-Net's test scripts: ConvTranspose in 3D,
bilinear in 2D (its mcnet2d_v2 lists the bilinear decoder first). Dice per the reference script:
Binary_dice_loss (linear, foreground) in 3D, its 2D DiceLoss (all classes, no factor 2) in 2D.
"""

from __future__ import annotations

import torch

from agcl.data.specs import DatasetSpec
from agcl.methods import Batch, HParam, Method, register_method, require_unlabeled
from agcl.methods.dice import soft_dice_loss
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, sharpen
from agcl.methods.ramps import epoch_rampup


def mutual_consistency(probs: list[torch.Tensor], temperature: float,
                       detach_targets: bool) -> torch.Tensor:
    """sum over ordered pairs i != j of mean((p_i - sharpen(p_j))^2)."""
    targets = [sharpen(p, temperature) for p in probs]
    if detach_targets:
        targets = [t.detach() for t in targets]
    loss = probs[0].new_zeros(())
    for i, p in enumerate(probs):
        for j, target in enumerate(targets):
            if i != j:
                loss = loss + ((p - target) ** 2).mean()
    return loss


@register_method("mc_net")
class McNet(Method):
    hyperparameters = {
        "dice_include_background": SUPERVISED_LOSS_HPARAMS["dice_include_background"],
        # train_mcnet_3d.py: losses.Binary_dice_loss on the foreground
        "dice_form": HParam("linear", "the reference's Dice form",
                            choices=SUPERVISED_LOSS_HPARAMS["dice_form"].choices),
        "temperature": HParam(0.1, "--temperature 0.1 (MC-Net train_mcnet_3d.py / _2d.py)",
                              low=0.0),
        "consistency": HParam(1.0, "--consistency 1 (train_mcnet_3d.py, LA)", low=0.0),
        "consistency_rampup": HParam(40.0, "--consistency_rampup 40 (LA), in 150-iteration "
                                     "epochs", low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num // 150)",
                                          low=1),
        "dice_weight": HParam(0.5, "--lamda 0.5 on the decoder-summed Dice (train_mcnet_3d.py)",
                              low=0.0),
        # MC-Net writes the sharpened targets into a fresh tensor by index assignment, which
        # autograd tracks: gradients flow through both sides. True = stop-gradient targets.
        "detach_targets": HParam(False, "stop-gradient on the sharpened targets"),
    }
    dataset_defaults = {
        # train_mcnet_2d.py: --consistency 0.1, --consistency_rampup 200, --lamda 1; its DiceLoss
        # averages every class including background.
        # Its DiceLoss is 1 - sum(pt) / (sum p^2 + sum t^2): no factor 2 (dice_form mcnet2d).
        # (CRAG, which no reference ships, takes the 2D recipe; a binary set keeps the
        # supervised baseline's Dice scope)
        "2d": {"consistency": 0.1, "consistency_rampup": 200.0, "dice_weight": 1.0,
               "dice_form": "mcnet2d"},
        "multiclass": {"dice_include_background": True},
    }

    @classmethod
    def net_name(cls, spec: DatasetSpec) -> str:
        return "mcnet3d" if spec.spatial_dims == 3 else "mcnet2d"

    def train_step(self, batch: Batch, step: int):
        x_unlabeled = require_unlabeled(batch, self.name)
        n_labeled = batch.x_labeled.shape[0]
        outputs = self.student.forward_all(torch.cat([batch.x_labeled, x_unlabeled]))
        # Dice only: MC-Net computes a CE term too but never adds it to the loss (MC-Net #4).
        loss_dice = sum(soft_dice_loss(logits[:n_labeled], batch.y_labeled,
                                       self.hparams["dice_include_background"],
                                       self.hparams["dice_form"])
                        for logits in outputs)
        probs = [torch.softmax(logits.float(), dim=1) for logits in outputs]
        loss_mc = mutual_consistency(probs, self.hparams["temperature"],
                                     self.hparams["detach_targets"])
        # MC-Net increments iter_num before computing the ramp, hence step + 1.
        weight = self.hparams["consistency"] * epoch_rampup(
            step + 1, self.hparams["rampup_epoch_iterations"], self.hparams["consistency_rampup"])
        loss_sup = self.hparams["dice_weight"] * loss_dice
        loss = loss_sup + weight * loss_mc
        logs = {"loss_dice": loss_dice.detach(), "loss_sup": loss_sup.detach(),
                "loss_mc": loss_mc.detach(), "cons_weight": weight}
        return loss, logs
