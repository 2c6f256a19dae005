"""BCP's copy-paste machinery (Bai et al., CVPR 2023, DeepMed-Lab-ECNU/BCP code/LA_BCP_train.py
and code/ACDC_BCP_train.py): box masks, the bidirectional copy-paste mixes, the mix loss,
pseudo-labels with the largest component, and the two-stage method built from them. BCP
(baselines/bcp.py) registers it as it is; Semi-AGCL (agcl/methods/semi_agcl/method.py) adds its terms to
it. How each piece follows the reference is told in baselines/bcp.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agcl.common.components import largest_component_per_class_batch
from agcl.methods.base import MAIN, PRETRAIN, SCHEDULE_KEYS, Batch, HParam, Method, Stage
from agcl.methods.dice import MASKED_FORMS, masked_dice_loss
from agcl.methods.ema import ema_update, make_ema_teacher

PSEUDO_LABELS = ("threshold", "argmax")
PRETRAIN_LOSSES = ("whole", "regions")
FIRST_MIX = ("labeled_outside_box", "unlabeled_outside_box")


# --- the reference's pieces, each on its own --------------------------------------------------
def bcp_box_mask(spatial: tuple[int, ...], ratio: float, rng: np.random.Generator,
                 device=None) -> torch.Tensor:
    """Ones with one zero box of side int(size * ratio) per axis; start in [0, size - side)
    (numpy's exclusive randint upstream), one box for the whole batch. The starts are host
    draws from `rng` (the "box_mask" stream), so no step waits on the device for them."""
    mask = torch.ones(spatial, device=device)
    box = []
    for size in spatial:
        side = int(size * ratio)
        start = int(rng.integers(0, max(1, size - side)))
        box.append(slice(start, start + side))
    mask[tuple(box)] = 0.0
    return mask


def masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the region, divided by its size (+1e-16), as mix_loss."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    weight = mask[:, 0].to(ce.dtype)
    return (ce * weight).sum() / (weight.sum() + 1e-16)


def mix_loss(logits: torch.Tensor, target_in: torch.Tensor, target_out: torch.Tensor,
             mask: torch.Tensor, weight_in: float, weight_out: float, dice_form: str
             ) -> torch.Tensor:
    """(Dice + CE) / 2 of a mixed image: `target_in` scored where mask is 1 (outside the box)
    with weight_in, `target_out` inside the box with weight_out. mask: (B, 1, *spatial)."""
    probs = torch.softmax(logits.float(), dim=1)
    inside = 1 - mask
    loss_dice = (masked_dice_loss(probs, target_in, dice_form, mask) * weight_in
                 + masked_dice_loss(probs, target_out, dice_form, inside) * weight_out)
    loss_ce = (masked_ce(logits, target_in, mask) * weight_in
               + masked_ce(logits, target_out, inside) * weight_out)
    return (loss_dice + loss_ce) / 2


@dataclass
class MixedPair:
    """One copy-paste mix of the main stage and what scores it; methods built on BCP
    (Semi-AGCL) read the rest."""

    logits: torch.Tensor
    features: torch.Tensor
    outside: torch.Tensor  # (B, 1, *spatial): the box mask M, 1 outside the box
    labeled_outside: bool  # the labeled image fills M (else the box)
    y_labeled: torch.Tensor
    pseudo: torch.Tensor  # the teacher's pseudo-label of the unlabeled image
    teacher_probs: torch.Tensor  # teacher softmax on the unlabeled half it came from
    teacher_features: torch.Tensor
    unlabeled: torch.Tensor  # that unlabeled half as sampled (before student_view)

    @property
    def unlabeled_region(self) -> torch.Tensor:
        return 1 - self.outside if self.labeled_outside else self.outside


class CopyPasteTeacher(Method):
    """BCP's two stages; registered as `bcp` by baselines/bcp.py, extended by Semi-AGCL."""

    hyperparameters = {
        "pretrain_iterations": HParam(2000, "LA_BCP_train.py --pre_max_iteration 2000 (0: none)",
                                      low=0),
        "pretrain_lr": HParam(0.01, "pre_train(): base_lr, never changed", low=0.0),
        "pretrain_schedule": HParam("constant", "lr schedule of the pre-training stage",
                                    choices=("constant", "poly", "step")),
        "ema_decay": HParam(0.99, "update_ema_variables(model, ema_model, 0.99), no warm-up",
                            low=0.0, high=1.0),
        "ema_buffers": HParam(False, "LA: parameters only; ACDC update_model_ema: whole "
                              "state_dict"),
        "u_weight": HParam(0.5, "--u_weight 0.5: weight of the pseudo-labeled region", low=0.0),
        "mask_ratio": HParam(2 / 3, "--mask_ratio 2/3 (LA), 2/3 of each side in generate_mask "
                             "(ACDC)", low=0.0, high=1.0),
        "pseudo_label": HParam("threshold", "LA get_cut_mask: softmax[:, 1] >= 0.5; ACDC argmax",
                               choices=PSEUDO_LABELS),
        "foreground_threshold": HParam(0.5, "the threshold of pseudo_label threshold", low=0.0,
                                       high=1.0),
        "largest_component": HParam(True, "LA get_cut_mask(nms=1), ACDC get_ACDC_masks(nms=1)"),
        "dice_form": HParam("per_sample_linear", "LA mask_DiceLoss; ACDC DiceLoss (batch_squared)",
                            choices=MASKED_FORMS),
        "pretrain_loss": HParam("whole", "LA: (CE + Dice) of the mixed label as a whole; ACDC: "
                                "its two regions apart", choices=PRETRAIN_LOSSES),
        "first_mix": HParam("labeled_outside_box", "LA mixl = img_a * M + unimg_a * (1 - M)",
                            choices=FIRST_MIX),
        "keep_optimizer_state": HParam(False, "LA self_train builds a new SGD optimiser; ACDC "
                                       "loads it (load_net_opt)"),
        "separate_forwards": HParam(True, "upstream calls the nets once per half-batch"),
    }
    dataset_defaults = {
        # BCP's ACDC code (the 2D recipe; CRAG, which no reference ships, takes it too)
        "2d": {"pretrain_iterations": 10000, "ema_buffers": True, "dice_form": "batch_squared",
               "pretrain_loss": "regions", "first_mix": "unlabeled_outside_box",
               "keep_optimizer_state": True},  # ACDC self_train: load_net_opt(model, optimizer)
        # several foreground classes: argmax pseudo-labels (a binary set thresholds, as LA)
        "multiclass": {"pseudo_label": "argmax"},
    }

    @classmethod
    def stages(cls, hparams, train_cfg):
        main = Stage(MAIN, train_cfg["iterations"], {k: train_cfg[k] for k in SCHEDULE_KEYS},
                     keep_optimizer_state=hparams["keep_optimizer_state"])
        if hparams["pretrain_iterations"] == 0:
            return [main]
        schedule = {**main.schedule, "lr": hparams["pretrain_lr"],
                    "schedule": hparams["pretrain_schedule"]}
        return [Stage(PRETRAIN, hparams["pretrain_iterations"], schedule), main]

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        if hparams["pseudo_label"] == "threshold" and spec.num_classes != 2:
            raise ValueError(f"{self.name}: pseudo_label threshold needs 2 classes, "
                             f"{spec.name} has {spec.num_classes} (use argmax)")
        self.teacher = make_ema_teacher(self.student)

    # --- stages ---------------------------------------------------------------------------
    def start_stage(self, name: str, fresh: bool) -> None:
        super().start_stage(name, fresh)
        if name == MAIN and fresh:  # teacher and student both start from the handed-on weights
            self.teacher.load_state_dict(self.student.state_dict())

    def after_optimizer_step(self, step: int) -> None:
        if self.stage == MAIN:
            ema_update(self.teacher, self.student, self.hparams["ema_decay"],
                       buffers=self.hparams["ema_buffers"])

    # --- steps ----------------------------------------------------------------------------
    def train_step(self, batch: Batch, step: int):
        if self.stage == PRETRAIN:
            return self.pretrain_step(batch)
        pairs = self.mixed_pairs(batch)
        losses = [self.pair_loss(pair) for pair in pairs]
        loss_bcp = losses[0] + losses[1]
        extra, logs = self.extra_loss(pairs, step)
        logs = {"loss_mix_a": losses[0].detach(), "loss_mix_b": losses[1].detach(),
                "loss_bcp": loss_bcp.detach(), **logs}
        return loss_bcp + extra if extra is not None else loss_bcp, logs

    def extra_loss(self, pairs: list[MixedPair], step: int):
        """Methods built on BCP add their own terms here; BCP has none."""
        return None, {}

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = x.shape[0] // 2
        return x[:half], x[half:]

    def pretrain_step(self, batch: Batch):
        x_a, x_b = self._halves(batch.x_labeled)
        y_a, y_b = self._halves(batch.y_labeled)
        if x_a.shape[0] == 0 or x_a.shape[0] != x_b.shape[0]:
            raise ValueError(f"{self.name} pre-training mixes two labeled halves: the labeled batch "
                             f"needs an even size >= 2, got {batch.x_labeled.shape[0]}")
        mask = self.box_mask(x_a)
        x = x_a * mask + x_b * (1 - mask)
        logits = self.student(x)
        if self.hparams["pretrain_loss"] == "whole":
            y = torch.where(mask > 0.5, y_a, y_b)
            probs = torch.softmax(logits.float(), dim=1)
            ce = F.cross_entropy(logits.float(), y.long())
            dice = masked_dice_loss(probs, y, self.hparams["dice_form"])
            loss = (ce + dice) / 2
        else:
            region = mask.expand(x_a.shape[0], 1, *mask.shape)
            loss = mix_loss(logits, y_a, y_b, region, 1.0, 1.0, self.hparams["dice_form"])
        return loss, {"loss_pretrain": loss.detach()}

    def box_mask(self, x: torch.Tensor) -> torch.Tensor:
        """This step's box mask over the spatial shape of x, from the "box_mask" stream."""
        return bcp_box_mask(tuple(x.shape[2:]), self.hparams["mask_ratio"],
                            self.streams.numpy("box_mask"), x.device)

    @torch.no_grad()
    def pseudo_labels(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        if self.hparams["pseudo_label"] == "threshold":
            labels = (probs[:, 1] >= self.hparams["foreground_threshold"]).long()
        else:
            labels = probs.argmax(dim=1)
        if self.hparams["largest_component"]:
            labels = largest_component_per_class_batch(labels, self.spec.num_classes)
        return labels

    def _forward(self, net, inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.hparams["separate_forwards"]:
            return [net.forward_features(x) for x in inputs]
        logits, feats = net.forward_features(torch.cat(inputs))
        sizes = [x.shape[0] for x in inputs]
        return list(zip(logits.split(sizes), feats.split(sizes)))

    def paired_unlabeled(self, batch: Batch) -> torch.Tensor:
        """The batch's unlabeled images, as many as labeled ones and at least 2 (two halves to
        mix with the labeled halves), or a clear error."""
        x_u = batch.x_unlabeled
        if x_u is None or x_u.shape[0] != batch.x_labeled.shape[0] or x_u.shape[0] < 2:
            got = 0 if x_u is None else x_u.shape[0]
            raise ValueError(f"{self.name} mixes labeled and unlabeled halves: the batch needs as "
                             f"many unlabeled as labeled images, at least 2 each, got "
                             f"{batch.x_labeled.shape[0]} labeled and {got} unlabeled")
        return x_u

    def mixed_pairs(self, batch: Batch) -> list[MixedPair]:
        x_u = self.paired_unlabeled(batch)
        xl, yl, xu = (self._halves(t) for t in (batch.x_labeled, batch.y_labeled, x_u))
        with torch.no_grad():
            teacher_out = self._forward(self.teacher, list(xu))
            pseudo = [self.pseudo_labels(logits) for logits, _ in teacher_out]
            mask = self.box_mask(xl[0])
        outside = mask.expand(xl[0].shape[0], 1, *mask.shape)
        # Pair a and pair b are mixed in opposite directions (the "bidirectional" of BCP).
        first = self.hparams["first_mix"] == "labeled_outside_box"
        labeled_outside = [first, not first]
        views = [self.student_view(x) for x in xu]
        mixes = [xl[i] * outside + views[i] * (1 - outside) if labeled_outside[i]
                 else views[i] * outside + xl[i] * (1 - outside) for i in range(2)]
        student_out = self._forward(self.student, mixes)
        return [MixedPair(student_out[i][0], student_out[i][1], outside, labeled_outside[i],
                          yl[i], pseudo[i], torch.softmax(teacher_out[i][0].float(), 1),
                          teacher_out[i][1], xu[i]) for i in range(2)]

    def student_view(self, x_unlabeled: torch.Tensor) -> torch.Tensor:
        """The unlabeled images as the student sees them in a mix (BCP: unchanged)."""
        return x_unlabeled

    def pair_loss(self, pair: MixedPair) -> torch.Tensor:
        """mix_loss of one pair: ground truth with weight 1, pseudo-label with u_weight."""
        u = self.hparams["u_weight"]
        if pair.labeled_outside:
            t_in, w_in, t_out, w_out = pair.y_labeled, 1.0, pair.pseudo, u
        else:
            t_in, w_in, t_out, w_out = pair.pseudo, u, pair.y_labeled, 1.0
        return mix_loss(pair.logits, t_in, t_out, pair.outside, w_in, w_out,
                        self.hparams["dice_form"])
