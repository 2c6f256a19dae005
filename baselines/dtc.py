"""Dual-task consistency (Luo et al., AAAI 2021), as HiLab-git/DTC code/train_la_dtc.py (LA).

One V-Net decoder with two heads (agcl.nets.vnet_sdf): a foreground logit z and a tanh signed
distance map s. The signed distance turns into a mask through sigmoid(-k s), k = 1500, and the
two tasks are pulled together on every image of the batch, labeled and unlabeled:

    loss = Dice(sigmoid(z_l), y) + beta * MSE(s_l, sdf(y))                 train_la_dtc.py:180-188
         + w(t) * mean((sigmoid(-k s) - sigmoid(z))^2)                    :185-191

Nothing is detached: the consistency's gradient reaches both heads (:185-187). The BCE of z_l the
reference computes is never added (:181-182, logged only). w(t) = consistency *
sigmoid_rampup(iter_num // 150, 40) with iter_num read before its increment (:189, :200), i.e.
the engine's 0-based step. Recipe (config/reference.yaml): 6000 iterations, batch 4 (2 labeled),
SGD lr 0.01 x0.1 every 2500 iterations, momentum 0.9, weight decay 1e-4 (:33-39, :144-145,
:251-254), the engine's defaults otherwise. Inference: sigmoid(z) > 0.5 (test_util.py:110,122),
the argmax of the net's [0, z] logits.

3D only: DTC ships its LA code alone, and SSL4MIS, which re-implements the 2D references on
ACDC, has no DTC (its utils/util.py holds compute_sdf, but no training script calls it and no
2D net has a signed-distance head). A 2D dataset is refused (Method.unsupported: configs list dtc in datasets.<d>.skip_methods).
"""

from __future__ import annotations

import torch

from agcl.data.specs import DatasetSpec
from agcl.methods import Batch, HParam, Method, register_method, require_unlabeled
from agcl.methods.ramps import epoch_rampup
from agcl.methods.sdf import SDF_SUPERVISED_HPARAMS, sdf_supervised_loss


def sdf_to_mask(sdf: torch.Tensor, k: float) -> torch.Tensor:
    """sigmoid(-k s): ~1 inside (s < 0), ~0 outside (train_la_dtc.py:185)."""
    return torch.sigmoid(-k * sdf)


def dual_task_consistency(sdf: torch.Tensor, probs: torch.Tensor, k: float) -> torch.Tensor:
    """mean((sigmoid(-k s) - p)^2) over every voxel of the batch, both sides with gradients
    (train_la_dtc.py:185-187)."""
    return torch.mean((sdf_to_mask(sdf, k) - probs) ** 2)


def _three_d_only(spec: DatasetSpec) -> str:
    return (f"dtc is 3D only: dataset '{spec.name}' trains on {spec.spatial_dims}D samples, and "
            "no reference ships a 2D DTC (HiLab-git/DTC trains LA with a 3D V-Net; SSL4MIS has "
            "no DTC for ACDC); run dtc on a 3D dataset (la)")


@register_method("dtc")
class Dtc(Method):
    hyperparameters = {
        **SDF_SUPERVISED_HPARAMS,
        "transform_k": HParam(1500.0, "k of sigmoid(-k sdf), the signed distance -> mask "
                              "transform (train_la_dtc.py:185)", low=0.0),
        "consistency": HParam(1.0, "--consistency 1.0, the weight's maximum "
                              "(train_la_dtc.py:60-61,94); its --consistency_weight 0.1 is unused",
                              low=0.0),
        "consistency_rampup": HParam(40.0, "--consistency_rampup 40 (train_la_dtc.py:62-63), in "
                                     "150-iteration epochs", low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num // 150) "
                                          "(train_la_dtc.py:189)", low=1),
    }

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str | None:
        return None if spec.spatial_dims == 3 else _three_d_only(spec)

    @classmethod
    def net_name(cls, spec: DatasetSpec) -> str:
        return "vnet_sdf"

    def train_step(self, batch: Batch, step: int):
        hp = self.hparams
        x_unlabeled = require_unlabeled(batch, self.name)
        sdf, foreground = self.student.forward_sdf(torch.cat([batch.x_labeled, x_unlabeled]))
        sdf, foreground = sdf.float(), foreground.float()
        probs = torch.sigmoid(foreground)  # outputs_soft, of every image (train_la_dtc.py:173)
        terms = sdf_supervised_loss(sdf, foreground, batch.y_labeled, hp["beta"], probs)
        loss_cons = dual_task_consistency(sdf, probs, hp["transform_k"])
        # iter_num is incremented after the ramp is read (train_la_dtc.py:189,200): step, not
        # step + 1.
        weight = hp["consistency"] * epoch_rampup(step, hp["rampup_epoch_iterations"],
                                                  hp["consistency_rampup"])
        loss = terms["loss_sup"] + weight * loss_cons
        logs = {name: value.detach() for name, value in terms.items()}
        logs.update(loss_cons=loss_cons.detach(), cons_weight=weight)
        return loss, logs
