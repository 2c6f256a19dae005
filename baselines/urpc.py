"""URPC: uncertainty-rectified pyramid consistency (Luo et al., MICCAI 2021 / MedIA 2022), as
SSL4MIS trains it: code/train_uncertainty_rectified_pyramid_consistency_2D.py (ACDC) and _3D.py
(LA; upstream trains it on BraTS2019). Line numbers below are of those two scripts.

One net predicts at four scales, each brought to the input size (agcl.nets.urpc: "urpc2d" is
SSL4MIS's UNet_URPC, whose auxiliary heads see perturbed features in train mode; "urpc3d" its
unet_3D_dv_semi). Labeled and unlabeled images go through it in one forward pass (2D :133, 3D
:132). With p_s the softmax of scale s and p = (p_0 + p_1 + p_2 + p_3) / 4 (2D :161, 3D :160):
  supervised   (sum_s CE_s + sum_s Dice_s) / 8 on the labeled part (2D :140-159, 3D :139-158);
               Dice = SSL4MIS DiceLoss on the softmax, squared denominators, every class incl.
               background (utils/losses.py:156-192)
  uncertainty  v_s = sum_c p (log p - log p_s) per voxel: KLDivLoss(reduction='none') of
               (log p_s, p), summed over classes (2D :125, :164-178; 3D :124, :163-177)
  consistency  L_s = mean((p - p_s)^2 exp(-v_s)) / (mean(exp(-v_s)) + 1e-8) + mean(v_s), the
               means over the unlabeled images, (classes) and voxels; L = mean_s L_s
               (2D :181-203, 3D :181-202)
  loss = supervised + w(t) L, w(t) = consistency * sigmoid_rampup(t // 150, rampup), t the
  0-based step: iter_num is incremented after the update (2D :180 / :213, 3D :179 / :212).
Nothing is detached: the gradient reaches every p_s through p, v_s and exp(-v_s) too, as upstream.
There is no teacher (the 3D script's update_ema_variables and --ema_decay are never used).

Recipes, both scripts: SGD momentum 0.9, weight decay 1e-4, poly lr (1 - t/T)^0.9 (2D :114-115,
:209; 3D :112-113, :208). 2D (ACDC): lr 0.01, 30000 iterations, batch 24 (12 labeled), 256x256,
consistency 0.1, rampup 200 (:36-59). 3D: lr 0.1, 60000 iterations, batch 4 (2 labeled),
96x96x96 BraTS patches, 3 classes, consistency 0.1, rampup 400 (:38-64, :81); LA keeps the
script's recipe but its own patch (112x112x80) and 2 classes.

Where ours differs from upstream, and why:
- The 2D feature-dropout factor u ~ U(0.7, 0.9) comes from torch's global CPU generator instead
  of numpy's (agcl.nets.urpc): the engine re-seeds both every step, but one generator lets a
  test align the draws with torch.manual_seed alone. Dropout and the feature noise use torch's
  global generators, as upstream.
- UNet_URPC's out_conv_dp4 never enters the forward pass, so "urpc2d" leaves it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agcl.data.specs import DatasetSpec
from agcl.methods import Batch, HParam, Method, register_method, require_unlabeled
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, supervised_loss
from agcl.methods.ramps import epoch_rampup


def multiscale_supervised_loss(outputs: list[torch.Tensor], target: torch.Tensor,
                               include_background: bool, form: str) -> dict:
    """(sum_s CE_s + sum_s Dice_s) / (2 S) over the S scales' labeled logits (2D :140-159); also
    the main scale's CE and Dice, the terms the 2D script logs (:216-217)."""
    terms = [supervised_loss(logits, target, include_background, form) for logits in outputs]
    ce = sum(t["loss_ce"] for t in terms)
    dice = sum(t["loss_dice"] for t in terms)
    return {"loss_ce": terms[0]["loss_ce"], "loss_dice": terms[0]["loss_dice"],
            "loss_sup": (ce + dice) / (2 * len(outputs))}


def rectified_consistency(probs: torch.Tensor, mean_probs: torch.Tensor, eps: float,
                          variance_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale's uncertainty-rectified consistency and its mean rectification weight.

    v = sum_c KL(mean_probs || probs) per voxel (B, 1, ...); loss = mean((mean_probs - probs)^2
    exp(-v)) / (mean(exp(-v)) + eps) + variance_weight * mean(v) (2D :164-166, :181-185).
    """
    variance = F.kl_div(torch.log(probs), mean_probs, reduction="none").sum(dim=1, keepdim=True)
    weight = torch.exp(-variance)
    distance = (mean_probs - probs) ** 2
    loss = (distance * weight).mean() / (weight.mean() + eps) + variance_weight * variance.mean()
    return loss, weight.mean()


def pyramid_consistency(probs: list[torch.Tensor], eps: float, variance_weight: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """mean over scales of rectified_consistency against the scales' mean softmax (2D :161-203),
    and the mean rectification weight over scales (logged)."""
    mean_probs = sum(probs) / len(probs)
    losses, weights = zip(*(rectified_consistency(p, mean_probs, eps, variance_weight)
                            for p in probs))
    return sum(losses) / len(losses), sum(weights) / len(weights)


@register_method("urpc")
class Urpc(Method):
    """URPC: one net's four scales pulled to their mean, weighted by exp(-KL) to it."""

    hyperparameters = {
        "dice_include_background": HParam(True, "DiceLoss(num_classes) averages every class "
                                          "incl. background (SSL4MIS utils/losses.py:156-192)"),
        "dice_form": SUPERVISED_LOSS_HPARAMS["dice_form"],  # squared: SSL4MIS DiceLoss
        "consistency": HParam(0.1, "--consistency 0.1 (2D :56-57, 3D :61-62)", low=0.0),
        "consistency_rampup": HParam(200.0, "--consistency_rampup 200 (2D :58-59), in "
                                     "150-iteration epochs", low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num // 150) "
                                          "(2D :180, 3D :179)", low=1),
        "rectify_eps": HParam(1e-8, "mean(d exp(-v)) / (mean(exp(-v)) + 1e-8) (2D :185, 3D :184)",
                              low=0.0),
        "variance_weight": HParam(1.0, "... + mean(v): the KL term enters with weight 1 "
                                  "(2D :185, 3D :184)", low=0.0),
    }
    dataset_defaults = {
        # the 3D script: --consistency_rampup 400 (:63-64)
        "3d": {"consistency_rampup": 400.0},
    }

    @classmethod
    def net_name(cls, spec: DatasetSpec) -> str:
        return "urpc3d" if spec.spatial_dims == 3 else "urpc2d"

    def train_step(self, batch: Batch, step: int):
        hp = self.hparams
        x_unlabeled = require_unlabeled(batch, self.name)
        n_labeled = batch.x_labeled.shape[0]
        outputs = self.student.forward_all(torch.cat([batch.x_labeled, x_unlabeled]))
        losses = multiscale_supervised_loss([o[:n_labeled] for o in outputs], batch.y_labeled,
                                            hp["dice_include_background"], hp["dice_form"])
        probs = [torch.softmax(o[n_labeled:].float(), dim=1) for o in outputs]
        loss_cons, rect_weight = pyramid_consistency(probs, hp["rectify_eps"],
                                                     hp["variance_weight"])
        weight = hp["consistency"] * epoch_rampup(step, hp["rampup_epoch_iterations"],
                                                  hp["consistency_rampup"])
        loss = losses["loss_sup"] + weight * loss_cons
        logs = {k: v.detach() for k, v in losses.items()}
        logs.update(loss_cons=loss_cons.detach(), cons_weight=weight,
                    rect_weight=rect_weight.detach())
        return loss, logs
