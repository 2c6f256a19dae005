"""Cross pseudo supervision (Chen et al., CVPR 2021), as HiLab-git/SSL4MIS
code/train_cross_pseudo_supervision_2D.py trains it on ACDC.

Two networks of the same architecture and initialisation scheme see the same batch; each is
supervised on the labeled half by 0.5 x (CE + SSL4MIS's DiceLoss on the softmax) (:181-184) and
on the unlabeled half by CE against the other's argmax pseudo-label (:186-190), weighted by
0.1 x sigmoid_rampup(iter_num // 150, 200) (:179, args :60-63); the loss is the sum of the two
nets' losses (:192-195) and each net has its own SGD (lr 0.01, momentum 0.9, weight decay 1e-4,
:153-156) under one poly schedule: here the peers are two TrainedNetworks of one SGD with the
same settings, which updates every parameter as two would. The script saves and tests model1:
the student is evaluated.

The 3D script (train_cross_pseudo_supervision_3D.py) trains BraTS on SSL4MIS's unet_3D with a
Kaiming-initialised and a Xavier-initialised net; this kit ships neither that net nor an LA
recipe of it, so CPS says unsupported on 3D datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agcl.data.specs import DatasetSpec
from agcl.methods import Batch, HParam, Method, TrainedNetwork, register_method, require_unlabeled
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, supervised_loss
from agcl.methods.ramps import epoch_rampup
from agcl.nets import build


@register_method("cps")
class CrossPseudoSupervision(Method):
    hyperparameters = {
        **SUPERVISED_LOSS_HPARAMS,
        "consistency": HParam(0.1, "--consistency 0.1 (train_cross_pseudo_supervision_2D.py:60)",
                              low=0.0),
        "consistency_rampup": HParam(200.0, "--consistency_rampup 200.0 (:62), in 'epochs'",
                                     low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num // 150) "
                                          "(:179)", low=1),
    }
    # SSL4MIS's DiceLoss averages every class, background included, on ACDC's labels
    dataset_defaults = {"multiclass": {"dice_include_background": True}}

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str | None:
        if spec.spatial_dims == 3:
            return ("SSL4MIS's 3D CPS script trains BraTS on its unet_3D, which this kit does not "
                    "ship; run cps on a 2D dataset (acdc, crag)")
        return None

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        # model2 = create_model(): a second net of the same kind, drawn after model1 (:124-125)
        with self.streams.seeded("cps_peer"):
            self.peer = build(self.net_name(spec), spec.in_channels, spec.num_classes,
                              **net_kwargs)

    def trained_networks(self) -> list[TrainedNetwork]:
        return [TrainedNetwork("student", self.student), TrainedNetwork("peer", self.peer)]

    def train_step(self, batch: Batch, step: int):
        x_u = require_unlabeled(batch, self.name)
        n = batch.x_labeled.shape[0]
        x = torch.cat([batch.x_labeled, x_u])
        logits1, logits2 = self.student(x), self.peer(x)
        weight = self.hparams["consistency"] * epoch_rampup(
            step, self.hparams["rampup_epoch_iterations"], self.hparams["consistency_rampup"])
        include_bg, form = self.hparams["dice_include_background"], self.hparams["dice_form"]
        sup1 = supervised_loss(logits1[:n], batch.y_labeled, include_bg, form)["loss_sup"]
        sup2 = supervised_loss(logits2[:n], batch.y_labeled, include_bg, form)["loss_sup"]
        # argmax of the softmax, as the script takes it (:186-187); no gradient through them
        pseudo1 = torch.softmax(logits1[n:].detach(), dim=1).argmax(1)
        pseudo2 = torch.softmax(logits2[n:].detach(), dim=1).argmax(1)
        cps1 = F.cross_entropy(logits1[n:], pseudo2)
        cps2 = F.cross_entropy(logits2[n:], pseudo1)
        loss1, loss2 = sup1 + weight * cps1, sup2 + weight * cps2
        return loss1 + loss2, {"model1_loss": loss1.detach(), "model2_loss": loss2.detach(),
                               "loss_sup": sup1.detach(), "loss_cps": cps1.detach(),
                               "cons_weight": weight}
