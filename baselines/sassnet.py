"""SASSNet (Li et al., MICCAI 2020): a signed-distance V-Net with an adversarial shape prior (LA).

Follows kleinzcy/SASSnet code/train_gan_sdfloss.py (lines cited below as train:N).

The net (vnet_sdf: V-Net with a sigmoid segmentation channel and a tanh signed-distance channel)
trains on the labeled scans with Dice on the sigmoid + beta * MSE(tanh, SDF of the label)
(train:156-170), and on the unlabeled ones through a discriminator that tells the distance maps
of labeled scans from those of unlabeled ones: the net is pushed to make its unlabeled maps pass
as labeled, with weight consistency * ramp(iter // 150) (train:168-176). The discriminator
(agcl.nets.discriminator) is an auxiliary update with its own Adam (lr 1e-4, betas 0.9/0.99,
train:124), stepped after the net's SGD on the whole batch, labeled 1 / unlabeled 0, from the
updated net's distance maps in eval mode without gradient (train:185-200).

What differs on purpose:
- The discriminator's weights receive no gradient from the net's loss. Upstream they do, and the
  next Dopt.zero_grad() (train:198) discards it: the same update.
- Targets follow the batch: upstream hard-codes Dtarget = [1, 1, 0, 0] (train:153) for its batch
  of 2 labeled + 2 unlabeled; here 1 for each labeled and 0 for each unlabeled image.
- The discriminator pools globally (see agcl/nets/discriminator.py): identical at 112x112x80.
- The unused BCE term (train:165, logged, never in the loss) is logged as loss_bce, as upstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from agcl.data.specs import DatasetSpec
from agcl.methods import AuxiliaryUpdate, Batch, HParam, Method, register_method, require_unlabeled
from agcl.methods.ramps import epoch_rampup
from agcl.methods.sdf import SDF_SUPERVISED_HPARAMS, sdf_supervised_loss
from agcl.nets.discriminator import ShapeDiscriminator3d

DISCRIMINATOR = "discriminator"


@register_method("sassnet")
class SassNet(Method):
    hyperparameters = {
        **SDF_SUPERVISED_HPARAMS,  # beta 0.3 (train:42, 170)
        "consistency": HParam(0.01, "--consistency 0.01: weight of the adversarial term (train:47)",
                              low=0.0),
        "consistency_rampup": HParam(40.0, "--consistency_rampup 40, in 150-iteration epochs "
                                     "(train:48)", low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num // 150), "
                                          "iter_num before its increment (train:168)", low=1),
        "discriminator_lr": HParam(1e-4, "--D_lr 1e-4, constant (train:37, 124)", low=0.0),
        "discriminator_beta1": HParam(0.9, "Adam betas=(0.9, 0.99) (train:124)", low=0.0,
                                      high=1.0),
        "discriminator_beta2": HParam(0.99, "Adam betas=(0.9, 0.99) (train:124)", low=0.0,
                                      high=1.0),
        "discriminator_width": HParam(64, "FC3DDiscriminator ndf=64 (discriminator.py:56)",
                                      low=1),
    }

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str | None:
        if spec.spatial_dims != 3:
            return (f"{spec.name} is {spec.spatial_dims}D; SASSNet's reference (kleinzcy/SASSnet) "
                    "and its discriminator are 3D only")
        return None

    @classmethod
    def net_name(cls, spec: DatasetSpec) -> str:
        return "vnet_sdf"

    def __init__(self, spec: DatasetSpec, hparams, net_kwargs, total_iterations: int):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        with self.streams.seeded("discriminator_init"):
            self.discriminator = ShapeDiscriminator3d(1, spec.in_channels,
                                                      hparams["discriminator_width"])

    def auxiliary_updates(self) -> list[AuxiliaryUpdate]:
        hp = self.hparams
        return [AuxiliaryUpdate(DISCRIMINATOR, tuple(self.discriminator.parameters()), "adam",
                                lr=hp["discriminator_lr"],
                                betas=(hp["discriminator_beta1"], hp["discriminator_beta2"]))]

    def train_step(self, batch: Batch, step: int):
        hp = self.hparams
        x_unlabeled = require_unlabeled(batch, self.name)
        n_labeled = batch.x_labeled.shape[0]
        self.student.train()
        self.discriminator.eval()  # train:154-155
        x = torch.cat([batch.x_labeled, x_unlabeled])
        sdf_pred, seg_logit = self.student.forward_sdf(x)
        # outputs_soft of the whole batch, as train:157, so the backward graph is the reference's
        terms = sdf_supervised_loss(sdf_pred, seg_logit, batch.y_labeled, hp["beta"],
                                    probs=torch.sigmoid(seg_logit.float()))
        # The net's gradient flows through the discriminator; the discriminator's own weights
        # take none (detached copies), which upstream's Dopt.zero_grad() would discard anyway.
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        judged = functional_call(self.discriminator, frozen,
                                 (sdf_pred[n_labeled:].float(), x_unlabeled))
        loss_adv = F.cross_entropy(judged, torch.ones(judged.shape[0], dtype=torch.long,
                                                      device=judged.device))
        weight = hp["consistency"] * epoch_rampup(step, hp["rampup_epoch_iterations"],
                                                  hp["consistency_rampup"])
        loss = terms["loss_sup"] + weight * loss_adv
        logs = {name: value.detach() for name, value in terms.items()}
        return loss, {**logs, "loss_adv": loss_adv.detach(), "cons_weight": weight}

    def auxiliary_step(self, name: str, batch: Batch, step: int):
        if name != DISCRIMINATOR:
            raise KeyError(f"sassnet has no auxiliary update {name!r}")
        x_unlabeled = require_unlabeled(batch, self.name)
        x = torch.cat([batch.x_labeled, x_unlabeled])
        self.student.eval()
        self.discriminator.train()  # train:185-186
        with torch.no_grad():
            sdf_pred, _ = self.student.forward_sdf(x)
        self.student.train()
        judged = self.discriminator(sdf_pred.float(), x)
        target = torch.cat([torch.ones(batch.x_labeled.shape[0], dtype=torch.long),
                            torch.zeros(x_unlabeled.shape[0], dtype=torch.long)]).to(x.device)
        loss = F.cross_entropy(judged, target)
        accuracy = (judged.detach().argmax(dim=1) == target).float().mean()
        return loss, {"discriminator_accuracy": accuracy}
