"""ABD (Chi et al., CVPR 2024): adaptive bidirectional displacement on BCP, as chy-upc/ABD
code/train_ACDC_BCP.py trains ACDC (cited script:N; the displacement code/utils/displacement.py
ABD_R_BCP, cited displacement.py:N).

Pre-training is BCP's ACDC stage (script:189-295: one net, 10000 iterations, two labeled halves
mixed by a 2/3 box, (Dice + CE) / 2 of the two regions). Self-training (script:297-437):
- two nets, both started from the pre-trained weights and optimiser state (:328-333: load_net_opt
  on both; here the peer is a TrainedNetwork with optimizer_state_from="student"), and BCP's EMA
  teacher of the first (whole state_dict, decay 0.99, :437);
- the loader gives every image a weak view (rot90 + flip or a rotation) and a strong one: a
  cutout of random 0/1 pixels whose label is set to background (p 0.5), then ColorJitter 0.8
  (dataloaders/dataset.py:101-136, 168-194);
- net 1 sees BCP's two copy-paste mixes of the weak views, net 2 the same mixes (one box) of the
  strong views, each scored by BCP's mix loss against the teacher's pseudo-labels of its own
  views (argmax, largest component per class, :364-408);
- each net is also supervised by the other's argmax on its mixes (Dice, :410-412), then
  ABD_R_BCP swaps, per image, one patch of a 4 x 4 grid between the weak and the strong mix
  (with probability 1/2 the most confident patch of one into the least confident of the other;
  else the least confident into the top-4 patch whose mean prediction is closest in KL,
  displacement.py:49-104), and both nets supervise each other on the 2B displaced images (:414-423);
- loss = sum over the nets of (BCP mix loss + both cross terms) (:425-427); model 1 (the
  student) is validated, saved and tested (:450-469).

What differs on purpose, with reasons:
- The weak views are the engine's augmentation (reference.yaml: rot_flip_rotate_or_none, the
  loader's 0.5 / 0.25 / 0.25); the strong view is made here on the device from the weak one with
  agcl.methods.augment (the cutout box drawn as UniMatch's CutMix box, ColorJitter's brightness
  then contrast, clipped to the dataset's intensity_range), where the loader jitters a tensor in a
  random order of brightness / contrast: a data-pipeline difference, not one of the step.
- The patch-choice coin is the method's own stream, where the script calls random.random().
- The script computes a consistency ramp (:376) that no loss uses: not declared here.
tests/test_ref_abd.py runs the script's own loop lines against this file on the same views.
ABD's BCP code is 2D (ACDC, PROMISE12): a 3D dataset is unsupported.
"""

from __future__ import annotations

import torch

from agcl.data.specs import DatasetSpec
from agcl.methods import Batch, HParam, TrainedNetwork, register_method
from agcl.methods.augment import brightness_contrast, cutmix_boxes
from agcl.methods.base import MAIN, PRETRAIN
from agcl.methods.copy_paste import CopyPasteTeacher, mix_loss
from agcl.methods.dice import masked_dice_loss
from agcl.nets import build


def _patches(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, [C,] H, W) -> (B, [C,] grid * grid, ph * pw), patches in row-major grid order (the
    script's rearrange 'b (h p1) (w p2) -> b (h w) (p1 p2)')."""
    *lead, height, width = x.shape
    ph, pw = height // grid, width // grid
    x = x.reshape(*lead, grid, ph, grid, pw).movedim(-3, -2)
    return x.reshape(*lead, grid * grid, ph * pw)


def _image(patches: torch.Tensor, grid: int, height: int, width: int) -> torch.Tensor:
    """The inverse of _patches for (B, grid * grid, ph * pw)."""
    ph, pw = height // grid, width // grid
    x = patches.reshape(-1, grid, grid, ph, pw).movedim(2, 3)
    return x.reshape(-1, height, width)


def displace(conf_1: torch.Tensor, conf_2: torch.Tensor, x_1: torch.Tensor, x_2: torch.Tensor,
             logits_1: torch.Tensor, logits_2: torch.Tensor, coins: list[bool], grid: int,
             top_num: int) -> torch.Tensor:
    """ABD_R_BCP (displacement.py:49-104): conf (B, H, W) the nets' max softmax, x (B, 1, H, W)
    their inputs, logits (B, C, H, W); `coins[i]` True takes the KL branch for image i. Returns
    the 2B displaced images (B, 1, H, W) x 2, the weak mixes' first."""
    height, width = x_1.shape[-2:]
    mean_1 = _patches(conf_1.detach(), grid).mean(2)  # (B, N)
    mean_2 = _patches(conf_2.detach(), grid).mean(2)
    out_1 = _patches(logits_1.detach(), grid).mean(3).transpose(1, 2)  # (B, N, C)
    out_2 = _patches(logits_2.detach(), grid).mean(3).transpose(1, 2)
    image_1 = _patches(x_1[:, 0], grid).clone()
    image_2 = _patches(x_2[:, 0], grid).clone()
    top_1 = mean_1.topk(top_num, dim=1).indices
    top_2 = mean_2.topk(top_num, dim=1).indices
    for i, kl_branch in enumerate(coins):
        b, d = int(mean_1[i].argmin()), int(mean_2[i].argmin())
        if kl_branch:
            target_1 = out_2[i, d].softmax(-1)  # the other view's least confident patch
            target_2 = out_1[i, b].softmax(-1)

            def closest(candidates, target):
                log_q = candidates.softmax(-1).log()
                kl = (target * (target.log() - log_q)).sum(-1)  # kl_div(log q, p, sum)
                return int(kl.argmin())

            a = int(top_1[i, closest(out_1[i, top_1[i]], target_1)])
            c = int(top_2[i, closest(out_2[i, top_2[i]], target_2)])
        else:
            a, c = int(mean_1[i].argmax()), int(mean_2[i].argmax())
        image_1[i, b] = image_2[i, c]
        image_2[i, d] = image_1[i, a]  # after the first swap, as the script reads it
    return _image(torch.cat([image_1, image_2]), grid, height, width).unsqueeze(1)


# BCP's hparams that choose what ABD's code fixes: pair a is the unlabeled image outside the
# box (script:378-379), each net is called once per mix (:387-388, 399-400), and pseudo-labels
# are argmax (get_ACDC_masks, :108-113) on every dataset, so no foreground threshold
_FIXED = ("first_mix", "separate_forwards", "foreground_threshold")


@register_method("abd")
class AdaptiveBidirectionalDisplacement(CopyPasteTeacher):
    hyperparameters = {
        **{name: hparam for name, hparam in CopyPasteTeacher.hyperparameters.items()
           if name not in _FIXED},
        "pseudo_label": HParam("argmax", "get_ACDC_masks: argmax of the softmax (script:108-113)",
                               choices=("argmax",)),
        "displacement_grid": HParam(4, "--h_size 4 --w_size 4: patches per side (script:49-50; "
                                    "--patch_size 64 of the 256 crop)", low=1),
        "top_num": HParam(4, "--top_num 4 (script:52)", low=1),
        "kl_branch_p": HParam(0.5, "random.random() < 0.5 takes the KL choice "
                              "(displacement.py:67)", low=0.0, high=1.0),
        "cutout_p": HParam(0.5, "cutout_gray(image, label, p=0.5) (dataset.py:180)", low=0.0,
                           high=1.0),
        "jitter": HParam(0.8, "ColorJitter(0.8 * s, 0.8 * s, ...), s = 1 (dataset.py:106-107)",
                         low=0.0),
        "cross_dice_form": HParam("squared", "DiceLoss() without a mask: smooth 1e-5 "
                                  "(utils/losses.py:177-185)", choices=("squared",)),
    }
    dataset_defaults = {
        **CopyPasteTeacher.dataset_defaults,
        # ABD's DiceLoss with a mask leaves the background class unmasked (see agcl/methods/dice.py)
        "2d": {**{k: v for k, v in CopyPasteTeacher.dataset_defaults["2d"].items()
                  if k not in _FIXED}, "dice_form": "batch_squared_bg_whole"},
    }

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str | None:
        if spec.spatial_dims == 3:
            return ("ABD's code trains 2D slices (ACDC, PROMISE12) on BCP's 2D recipe; run abd on "
                    "a 2D dataset (acdc, crag)")
        return None

    @classmethod
    def check_recipe(cls, hparams, train_cfg, spec):
        grid = hparams["displacement_grid"]
        patch = train_cfg.get("patch") or []
        if any(side % grid for side in patch[:2]):
            message = (f"abd: train.patch {list(patch)} must divide into displacement_grid "
                       f"{grid} patches per side (the reference: 256 = 4 x 64)")
            return [message]
        return []

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        with self.streams.seeded("abd_peer"):  # model_2 = BCP_net(...) (script:306)
            self.peer = build(self.net_name(spec), spec.in_channels, spec.num_classes,
                              **net_kwargs)

    def trained_networks(self) -> list[TrainedNetwork]:
        return [TrainedNetwork("student", self.student),
                TrainedNetwork("peer", self.peer, optimizer_state_from="student")]

    def start_stage(self, name: str, fresh: bool) -> None:
        super().start_stage(name, fresh)
        if name == MAIN and fresh:  # load_net_opt(model_2, ..., pre_trained_model) (:333)
            self.peer.load_state_dict(self.student.state_dict())

    def strong_views(self, x: torch.Tensor, y: torch.Tensor | None, g: torch.Generator):
        """The loader's strong view of every image: cutout (random 0 / 1 pixels, label 0 there)
        with p cutout_p, then brightness and contrast jitter."""
        box = cutmix_boxes(x.shape[:1] + x.shape[2:], g, x.device, p=self.hparams["cutout_p"])
        noise = torch.randint(0, 2, x.shape, generator=g, device=g.device).to(x.device, x.dtype)
        x_strong = torch.where(box.bool().unsqueeze(1), noise, x)
        x_strong = brightness_contrast(x_strong, g, brightness=self.hparams["jitter"],
                                       contrast=self.hparams["jitter"], p=1.0,
                                       clamp=self.spec.intensity_range)
        y_strong = None if y is None else torch.where(box.bool(), torch.zeros_like(y), y)
        return x_strong, y_strong

    def train_step(self, batch: Batch, step: int):
        if self.stage == PRETRAIN:
            return self.pretrain_step(batch)
        x_u = self.paired_unlabeled(batch)
        g = self.streams.torch("abd_strong", x_u.device)
        xl_s, yl_s = self.strong_views(batch.x_labeled, batch.y_labeled, g)
        xu_s, _ = self.strong_views(x_u, None, g)
        n_mixed = batch.x_labeled.shape[0]
        draws = self.streams.numpy("abd_displacement").random(n_mixed)
        coins = [bool(v < self.hparams["kl_branch_p"]) for v in draws]
        return self.loss_of_views(batch.x_labeled, batch.y_labeled, x_u, xl_s, yl_s, xu_s, coins)

    def loss_of_views(self, x_l, y_l, x_u, x_l_strong, y_l_strong, x_u_strong, coins,
                      mask: torch.Tensor | None = None):
        """The self-training step on given weak and strong views (script:356-427); `mask` the
        box mask (default: this step's draw from the box stream)."""
        h = self.hparams
        xl, yl, xu = (self._halves(t) for t in (x_l, y_l, x_u))
        xl_s, yl_s, xu_s = (self._halves(t) for t in (x_l_strong, y_l_strong, x_u_strong))
        with torch.no_grad():  # :364-373, the teacher in train mode as the script keeps it
            pseudo = [self.pseudo_labels(self.teacher(x)) for x in (*xu, *xu_s)]
            if mask is None:
                mask = self.box_mask(xl[0])
        outside = mask.expand(xl[0].shape[0], 1, *mask.shape)

        def mixes(labeled, unlabeled):  # :378-384: pair a unlabeled outside the box, b labeled
            return [unlabeled[0] * outside + labeled[0] * (1 - outside),
                    labeled[1] * outside + unlabeled[1] * (1 - outside)]

        def bcp_loss(logits, pseudo_a, pseudo_b, labels):  # :393-396, 405-408
            u = h["u_weight"]
            return (mix_loss(logits[0], pseudo_a, labels[0], outside, u, 1.0, h["dice_form"])
                    + mix_loss(logits[1], labels[1], pseudo_b, outside, 1.0, u, h["dice_form"]))

        inputs_1, inputs_2 = mixes(xl, xu), mixes(xl_s, xu_s)
        out_1 = [self.student(x) for x in inputs_1]
        out_2 = [self.peer(x) for x in inputs_2]
        loss_bcp_1 = bcp_loss(out_1, pseudo[0], pseudo[1], yl)
        loss_bcp_2 = bcp_loss(out_2, pseudo[2], pseudo[3], yl_s)
        logits_1, logits_2 = torch.cat(out_1), torch.cat(out_2)
        probs_1, probs_2 = logits_1.float().softmax(1), logits_2.float().softmax(1)

        def cross(probs, other_probs):
            return masked_dice_loss(probs, other_probs.detach().argmax(1), h["cross_dice_form"])

        cross_1, cross_2 = cross(probs_1, probs_2), cross(probs_2, probs_1)  # :411-412
        displaced = displace(probs_1.max(1).values, probs_2.max(1).values, torch.cat(inputs_1),
                             torch.cat(inputs_2), logits_1, logits_2, coins,
                             h["displacement_grid"], h["top_num"])
        probs_d1 = self.student(displaced).float().softmax(1)
        probs_d2 = self.peer(displaced).float().softmax(1)
        cross_3, cross_4 = cross(probs_d1, probs_d2), cross(probs_d2, probs_d1)  # :422-423
        loss_1 = loss_bcp_1 + cross_1 + cross_3
        loss_2 = loss_bcp_2 + cross_2 + cross_4
        return loss_1 + loss_2, {"loss_1": loss_1.detach(), "loss_2": loss_2.detach(),
                                 "loss_bcp_1": loss_bcp_1.detach(), "loss_cross": cross_1.detach(),
                                 "loss_displaced": cross_3.detach(),
                                 "kl_branch": sum(coins) / len(coins)}
