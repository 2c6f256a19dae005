"""UniMatch (Yang et al., CVPR 2023), as LiheYoung/UniMatch more-scenarios/medical/unimatch.py
trains ACDC (configs/acdc.yaml; cited unimatch.py:N).

Each step (unimatch.py:129-181):
- the net, in eval mode and without gradient, predicts a second unlabeled batch (the "mix"
  batch, :129-134); its argmax and confidence fill the CutMix boxes below;
- two strong views of the unlabeled batch (brightness / contrast jitter, Gaussian blur), each
  with the box region of its CutMix mask taken from a strong view of the mix batch (:136-139);
- one pass over labeled + weak unlabeled images whose decoder also runs on the encoder features
  after Dropout2d(0.5) (model/unet.py:168-173: clean and dropped features decoded as one batch,
  so the decoder's BatchNorm sees both), and one pass over the two strong views (:145-149);
- the weak view's argmax and confidence, the boxes filled from the mix batch (:151-162), are the
  pseudo-labels of the strong views; the plain weak ones supervise the feature-perturbed pass;
- loss = (loss_x + 0.25 loss_s1 + 0.25 loss_s2 + 0.5 loss_fp) / 2 (:175), loss_x =
  (CE + Dice) / 2 (:164), each unlabeled term the Dice of the softmax over the pixels whose
  confidence reaches conf_thresh 0.95 (configs/acdc.yaml), every class counted (util/utils.py).

What differs on purpose, with reasons:
- The strong views are made on the device by agcl.methods.augment (brightness then contrast,
  a true Gaussian), not in the loader by torchvision's ColorJitter on a uint8 PIL image (a random
  order of brightness / contrast, PIL's box-approximated blur, 8-bit quantisation): the engine's
  batches are tensors, and this keeps each view's draws in the method's own stream.
- The reference draws the mix batch from a second loader over the same unlabeled set; here it is
  the engine's extra unlabeled batch (Method.extra_unlabeled_batches), drawn the same way.
The step itself (every loss term, gradient and update) equals the script's on the same views:
tests/test_ref_unimatch.py runs the script's own loop lines against this file.

UniMatch's medical code trains ACDC's 2D slices only: a 3D dataset is unsupported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agcl.data.specs import DatasetSpec
from agcl.methods import Batch, HParam, Method, register_method, require_unlabeled
from agcl.methods.augment import brightness_contrast, cutmix_boxes, gaussian_blur, mix
from agcl.methods.dice import masked_dice_loss
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, supervised_loss


@register_method("unimatch")
class UniMatch(Method):
    extra_unlabeled_batches = 1  # the mix batch (unimatch.py:80-82, 116-120)
    hyperparameters = {
        **SUPERVISED_LOSS_HPARAMS,
        "conf_thresh": HParam(0.95, "conf_thresh: 0.95 (configs/acdc.yaml)", low=0.0, high=1.0),
        "strong_weight": HParam(0.25, "loss_u_s1 * 0.25 + loss_u_s2 * 0.25 (unimatch.py:175)",
                                low=0.0),
        "fp_weight": HParam(0.5, "loss_u_w_fp * 0.5 (unimatch.py:175)", low=0.0),
        "feature_dropout": HParam(0.5, "nn.Dropout2d(0.5) on every encoder feature "
                                  "(model/unet.py:172)", low=0.0, high=1.0),
        "jitter": HParam(0.5, "ColorJitter(0.5, 0.5, ...) brightness and contrast "
                         "(dataset/acdc.py:60, 66)", low=0.0),
        "jitter_p": HParam(0.8, "ColorJitter applied with probability 0.8 (dataset/acdc.py:59)",
                           low=0.0, high=1.0),
        "blur_p": HParam(0.5, "blur(img, p=0.5), sigma in [0.1, 2.0] (dataset/acdc.py:61, "
                         "transform.py:99-103)", low=0.0, high=1.0),
        "cutmix_p": HParam(0.5, "obtain_cutmix_box(size, p=0.5) (dataset/acdc.py:62)",
                           low=0.0, high=1.0),
    }
    dataset_defaults = {"multiclass": {"dice_include_background": True}}

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str | None:
        if spec.spatial_dims == 3:
            return ("UniMatch's medical code (more-scenarios/medical) trains ACDC's 2D slices "
                    "only; run unimatch on a 2D dataset (acdc, crag)")
        return None

    def strong_view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # ColorJitter clips to the 8-bit image's range: here the dataset's declared bounds
        # (ACDC [0, 1]; none on normalised data)
        jittered = brightness_contrast(x, generator, brightness=self.hparams["jitter"],
                                       contrast=self.hparams["jitter"],
                                       p=self.hparams["jitter_p"],
                                       clamp=self.spec.intensity_range)
        return gaussian_blur(jittered, generator, p=self.hparams["blur_p"])

    def train_step(self, batch: Batch, step: int):
        x_u = require_unlabeled(batch, self.name)
        (x_mix,) = batch.x_unlabeled_extra
        g = self.streams.torch("unimatch_views", x_u.device)
        boxes = [cutmix_boxes(x_u.shape[:1] + x_u.shape[2:], g, x_u.device,
                              p=self.hparams["cutmix_p"]) for _ in range(2)]
        strong = [self.strong_view(x_u, g) for _ in range(2)]
        strong_mix = [self.strong_view(x_mix, g) for _ in range(2)]
        return self.loss_of_views(batch.x_labeled, batch.y_labeled, x_u, x_mix,
                                  [mix(s, s_mix, box)
                                   for s, s_mix, box in zip(strong, strong_mix, boxes)], boxes)

    def loss_of_views(self, x_l, y_l, x_weak, x_mix, strong_mixed, boxes):
        """The step on given views: `strong_mixed` the two strong views with their CutMix boxes
        already filled from the mix batch's strong views (unimatch.py:136-139)."""
        net, h = self.student, self.hparams
        with torch.no_grad():  # :129-134
            net.eval()
            p_mix = net(x_mix).detach().softmax(dim=1)
            conf_mix, pseudo_mix = p_mix.max(dim=1)
            net.train()
        n = x_l.shape[0]
        skips = net.encode(torch.cat([x_l, x_weak]))
        dropped = [torch.cat([s, F.dropout2d(s, h["feature_dropout"], training=True)])
                   for s in skips]
        logits, _ = net.decode(dropped)
        clean, perturbed = logits.chunk(2)
        logits_x, logits_weak, logits_fp = clean[:n], clean[n:], perturbed[n:]
        logits_s1, logits_s2 = net(torch.cat(strong_mixed)).chunk(2)

        conf, pseudo = logits_weak.detach().softmax(dim=1).max(dim=1)
        sup = supervised_loss(logits_x, y_l, h["dice_include_background"], h["dice_form"])
        threshold = h["conf_thresh"]

        def dice_where_confident(logits_u, target, confidence):
            keep = (confidence >= threshold).unsqueeze(1)
            return masked_dice_loss(logits_u.float().softmax(dim=1), target, "squared", keep)

        loss_s = [dice_where_confident(lg, mix(pseudo, pseudo_mix, box), mix(conf, conf_mix, box))
                  for lg, box in zip((logits_s1, logits_s2), boxes)]
        loss_fp = dice_where_confident(logits_fp, pseudo, conf)
        loss = (sup["loss_sup"] + h["strong_weight"] * (loss_s[0] + loss_s[1])
                + h["fp_weight"] * loss_fp) / 2.0
        return loss, {"loss_sup": sup["loss_sup"].detach(), "loss_s1": loss_s[0].detach(),
                      "loss_s2": loss_s[1].detach(), "loss_fp": loss_fp.detach(),
                      "mask_ratio": (conf >= threshold).float().mean()}
