"""AD-MT, alternate diverse teaching (Zhao et al., ECCV 2024), as ZhenZHAO/AD-MT trains it:
code/train_post_3d_aut.py on LA with cfgs/config_3d_la_aut.yml ("3d" defaults, cited 3d:N) and
code/train_post_2d_aut.py on ACDC with cfgs/config_2d_aut.yml ("2d" defaults, cited 2d:N);
code/train_utils.py (cited utils:N) holds the alternation and the teacher/student compromise.

One student and two EMA teachers, each created as a net of its own (3d:85-87, 2d:97-99). Each step
(3d:180-367, 2d:192-378):
- alternation (utils:12-60): a flag says which teacher is updated this period, starting with the
  first; a period lasts a random number of steps in [1, alt_param_updating_period_iters]
  (np.random.randint(1, period + 1), drawn anew at every switch). The updated teacher runs in train
  mode (batch statistics, dropout, its BatchNorm statistics move), the other in eval mode
  (3d:207-212);
- both teachers predict the weak unlabeled images; their softmax outputs are ensembled with weights
  exp(-H_k) / (exp(-H_1) + exp(-H_2)), H the entropy in bits, sharpened by 1/T and renormalised;
  the ensemble's max and argmax are the pseudo-label, and the pixels where the two teachers' argmax
  differ are the teacher conflict (3d:215-240);
- distinct augmentation per teacher (3d:251-278): while the first teacher is updated the
  unlabeled images' strong view is the loader's photometric one (LA: brightness / contrast on
  the min-max normalised crop, p 0.8, then clipped Gaussian noise, p 0.2; ACDC: ColorJitter
  brightness / contrast, p 0.8, then Gaussian blur, p 0.2; dataset_3d.py:93-130, 235-280,
  dataset_2d.py:150-183, 255-281); while the second is updated it is a CutMix of the weak view
  (with probability cutmix_prob: one lam ~ Beta(4, 4) per batch, one box per sample of side
  sqrt(1 - lam) of every axis centred at randint(S/8, S), pasted from a permutation of the batch;
  pseudo-label, confidence and conflict map mixed alike; mixaugs.py:10-36, 77-112, 118-227);
- the student sees labeled, weak unlabeled and strong unlabeled images in one pass (3d:281-284);
  its confidence and argmax on the weak view compete with the pseudo-label on the teacher-conflict
  pixels under alt_flag_conflict_mode (pixel_confidence: the more confident wins; utils:144-180);
- loss = (CE + Dice) / 2 on the labeled part (Dice of every class incl. background, squared
  denominators; utils/losses.py:157-193) + consistency x sigmoid_rampup(iter // 150,
  consistency_rampup) x the unlabeled loss on the strong view over the pixels whose (compromised)
  confidence reaches conf_threshold: CE on LA, the masked Dice on ACDC (flag_ulb_loss_type;
  3d:296-343, 2d:309-354); with alt_param_conflict_weight != 1 the consistent and conflicting
  pixels are scored apart and the second weighted (3d:310-330, 2d:323-342);
- after the student's SGD step the teacher of the period follows it by EMA over parameters AND
  buffers, at global step iter // 2, with alpha 0 while that step is below consistency_rampup and
  min(1 - 1 / (step - consistency_rampup + 1), 0.99) after (3d:40-53, 350-357); then the
  alternation counts the step (utils:53-60).
lr: SGD 0.01, momentum 0.9, weight decay 1e-4, poly 0.9 set after each step from the step just
taken (3d:128-129, 361-367): the engine's "poly_lagged". The scripts save and test the best
STUDENT (test_*.sh pass --flag_check_with_best_stu; test_performance_3d.py:53-57): the student is
evaluated.

What differs on purpose, with reasons:
- The strong views are made on the device from the method's own stream ("ad_mt_views"), not in
  the loader with numpy / PIL: LA's brightness-contrast and noise follow the loader's formulas
  here (la_strong_view); ACDC's use agcl.methods.augment (ColorJitter's brightness then contrast
  and a true Gaussian blur, as baselines/unimatch.py), not PIL's random-order ColorJitter on an
  8-bit image and its box-approximated blur. The engine's batches are tensors.
- The CutMix draws, the period draws and conflict_mode "random" come from the method's streams
  ("ad_mt_cutmix", "ad_mt_period", "ad_mt_conflict"), not numpy's / torch's global RNG; the
  alternation's state (flag, counter, period) is checkpointed with the method (extra state).
- CE over an empty confident set is 0 here (the script's mean over no pixel is NaN).
- The EMA copies the student's integer buffers (BatchNorm's num_batches_tracked, unused with a
  momentum) instead of the script's float blend of them (agcl.methods.ema.ema_update).
- alt_flag_updating_period_random False keeps the period fixed at alt_param_updating_period_iters;
  the script's False path stores the flag (True == 1) as the period, so it would switch teachers
  at every step (utils:21, 32, 46). Both cfgs set True.
- The unlabeled loss always takes the teacher/student compromise; the scripts skip it on their
  non-cfg branch (LA with "dice", 3d:336-339; ACDC with "ce", 2d:348-350).
- Not carried over: the scripts' switched-off branches (flag_start_self_learning is always False,
  flag_pseudo_from_student and alt_flag_epoch_shuffle_teachers are False in both cfgs).
The step (every loss term, gradient, the student's update and both teachers') equals the script's
on the same views: tests/test_ref_ad_mt.py runs the scripts' own loop lines against this file.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agcl.methods import Batch, HParam, Method, register_method, require_unlabeled
from agcl.methods.augment import brightness_contrast, gaussian_blur, mix
from agcl.methods.dice import masked_dice_loss
from agcl.methods.ema import ema_update
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, supervised_loss
from agcl.methods.ramps import epoch_rampup
from agcl.nets import build

CONFLICT_MODES = ("pixel_confidence", "random", "always_tea", "always_stu")
IGNORE = -100


def ensemble_of_teachers(soft_1: torch.Tensor, soft_2: torch.Tensor, temperature: float):
    """(confidence, pseudo-label, teacher conflict) of two teachers' softmax outputs: entropy-
    weighted average, sharpened by 1/T and renormalised (train_post_3d_aut.py:221-240)."""
    conflict = soft_1.argmax(dim=1) != soft_2.argmax(dim=1)
    entropy_1 = -torch.sum(soft_1 * torch.log2(soft_1 + 1e-10), dim=1)
    entropy_2 = -torch.sum(soft_2 * torch.log2(soft_2 + 1e-10), dim=1)
    weights_1 = torch.exp(-entropy_1) / (torch.exp(-entropy_1) + torch.exp(-entropy_2))
    weights_2 = 1.0 - weights_1
    weighted = weights_1.unsqueeze(1) * soft_1 + weights_2.unsqueeze(1) * soft_2
    weighted = torch.pow(weighted, 1.0 / temperature)
    weighted = weighted / torch.sum(weighted, dim=1, keepdim=True)
    confidence, pseudo = torch.max(weighted, dim=1)
    return confidence, pseudo, conflict


def compromise(target_tea, conf_tea, target_stu, conf_stu, mode: str, teacher_conflict,
               student_wins_all: bool | None = None):
    """get_compromise_pseudo_btw_tea_stu (train_utils.py:144-180): on the pixels where the
    pseudo-label and the student's argmax differ (and, given `teacher_conflict`, the teachers
    too), the student's label and confidence replace the teachers' per `mode`."""
    target, conf = target_tea.clone(), conf_tea.clone()
    conflict = target_tea != target_stu
    if teacher_conflict is not None:
        conflict = conflict & teacher_conflict
    if mode == "pixel_confidence":
        take = (conf_stu > conf_tea) & conflict
    elif mode == "always_stu":
        take = conflict
    elif mode == "random":
        take = conflict if student_wins_all else None
    else:  # always_tea
        take = None
    if take is not None:
        target = torch.where(take, target_stu, target)
        conf = torch.where(take, conf_stu, conf)
    return target, conf


def cross_entropy_over(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(..., ignore_index=-100, reduction="mean"), 0 where nothing counts."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp_min(1)


def la_strong_view(x: torch.Tensor, generator: torch.Generator, *, limit: float, color_p: float,
                   noise_p: float, noise_sigma: tuple[float, float]) -> torch.Tensor:
    """LA's loader strong view (dataset_3d.py:93-130): RandomBrightnessContrast (:250-280, with
    randcolor.py's adjust: on the crop min-max normalised, x a + b mean(x a), clipped to [0, 1],
    back to the crop's range; a = 1 + U(-l, l), b = U(-l, l); probability color_p), then
    RandomGaussianNoise (:235-247: sigma ~ U(noise_sigma), clip(sigma N(0, 1), +-2 sigma);
    probability noise_p), per sample."""
    n, device = x.shape[0], x.device
    draws = torch.rand((n, 6), generator=generator, device=device, dtype=torch.float64)
    shape = (n, *[1] * (x.dim() - 1))

    def per_sample(values):
        return values.to(x.dtype).view(shape)

    alpha = per_sample(1.0 + limit * (2 * draws[:, 0] - 1))
    beta = per_sample(limit * (2 * draws[:, 1] - 1))
    dims = tuple(range(1, x.dim()))
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    scaled = (x - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny) * alpha
    scaled = (scaled + beta * scaled.mean(dim=dims, keepdim=True)).clamp(0.0, 1.0)
    out = torch.where(per_sample(draws[:, 2] < color_p).bool(), scaled * (high - low) + low, x)
    sigma = per_sample(noise_sigma[0] + (noise_sigma[1] - noise_sigma[0]) * draws[:, 3])
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) * sigma
    noise = torch.maximum(torch.minimum(noise, 2 * sigma), -2 * sigma)
    return torch.where(per_sample(draws[:, 4] < noise_p).bool(), out + noise, out)


def cutmix_boxes_3d_style(shape: tuple[int, ...], rng: np.random.Generator,
                          device: torch.device) -> torch.Tensor:
    """rand_bbox / rand_bbox_3d (mixaugs.py:10-36, 118-146): lam ~ Beta(4, 4) for the batch; per
    sample a box of side int(S sqrt(1 - lam)) on every spatial axis S, centred at an integer in
    [S / 8, S), clipped to the image. A (B, *spatial) bool mask."""
    n, spatial = shape[0], shape[1:]
    cut_rat = math.sqrt(1.0 - rng.beta(4, 4))
    mask = torch.zeros((n, *spatial), dtype=torch.bool)
    centres = [rng.integers(int(size / 8), size, size=n) for size in spatial]
    for i in range(n):
        region = []
        for size, c in zip(spatial, centres):
            half = int(size * cut_rat) // 2
            region.append(slice(int(np.clip(c[i] - half, 0, size)),
                                int(np.clip(c[i] + half, 0, size))))
        mask[(i, *region)] = True
    return mask.to(device)


@register_method("ad_mt")
class ADMT(Method):
    hyperparameters = {
        **SUPERVISED_LOSS_HPARAMS,
        "dice_include_background": HParam(
            True, "losses.DiceLoss(num_classes) scores every class incl. background "
            "(train_post_3d_aut.py:131, 290-294; train_post_2d_aut.py:144, 303-307)"),
        "ema_decay": HParam(0.99, "ema_decay: 0.99 (both cfgs; update_ema_variables, "
                            "train_post_3d_aut.py:40-53)", low=0.0, high=1.0),
        "ema_step_divisor": HParam(2, "update_ema_variables(..., iter_num//2, args) "
                                   "(train_post_3d_aut.py:353-355, 2d:364-366); its warm-up: "
                                   "alpha 0 while iter_num//2 < consistency_rampup (:42-45)", low=1),
        "consistency": HParam(2.0, "consistency: 2.0 (both cfgs)", low=0.0),
        "consistency_rampup": HParam(40.0, "consistency_rampup: 40 (config_3d_la_aut.yml), 50 "
                                     "(config_2d_aut.yml), in 150-iteration epochs; also the "
                                     "EMA warm-up (train_post_3d_aut.py:42)", low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num//150, "
                                          "args) (train_post_3d_aut.py:342, 2d:353)", low=1),
        "conf_threshold": HParam(0.8, "conf_threshold: 0.8 (config_3d_la_aut.yml), 0.95 "
                                 "(config_2d_aut.yml)", low=0.0, high=1.0),
        "ulb_loss_type": HParam("ce", "flag_ulb_loss_type: ce (config_3d_la_aut.yml), dice "
                                "(config_2d_aut.yml)", choices=("ce", "dice")),
        "conflict_mode": HParam("pixel_confidence", "alt_flag_conflict_mode: pixel_confidence "
                                "(both cfgs; train_utils.py:144-180)", choices=CONFLICT_MODES),
        "conflict_student_use_more": HParam(False, "alt_flag_conflict_stu_use_more: False (both "
                                            "cfgs): compete on every teacher/student conflict, "
                                            "not only where the teachers conflict (3d:306-309)"),
        "conflict_weight": HParam(1.0, "alt_param_conflict_weight: 1.0 (both cfgs; != 1 scores "
                                  "consistent and conflicting pixels apart, 3d:310-330)"),
        "ensemble_temp": HParam(1.0, "alt_param_ensemble_temp: 1.0 (both cfgs; "
                                "train_post_3d_aut.py:236)", low=1e-6),
        "updating_period": HParam(19, "alt_param_updating_period_iters: 19 "
                                  "(config_3d_la_aut.yml), 50 (config_2d_aut.yml); half an "
                                  "epoch", low=1),
        "updating_period_random": HParam(True, "alt_flag_updating_period_random: True (both "
                                         "cfgs): each period randint(1, period + 1) steps "
                                         "(train_utils.py:18-19, 59-60)"),
        "cutmix_prob": HParam(1.0, "cutmix_prob: 1.0 (both cfgs; train_post_3d_aut.py:261)",
                              low=0.0, high=1.0),
        "color_limit": HParam(0.5, "brightness_limit=0.5, contrast_limit=0.5 (dataset_3d.py:98-"
                              "99); ColorJitter(0.5, 0.5, ...) (dataset_2d.py:262)", low=0.0,
                              high=1.0),
        "color_p": HParam(0.8, "RandomBrightnessContrast prob=p_color=0.8 (dataset_3d.py:94, "
                          "100); func_strong_augs(p_color=0.8) (dataset_2d.py:170)", low=0.0,
                          high=1.0),
        "noise_p": HParam(0.2, "LA: RandomGaussianNoise apply_prob=p_blur=0.2, sigma in [0.1, "
                          "1.0] (dataset_3d.py:94, 101-102); ACDC: blur p_blur=0.2, sigma in "
                          "[0.1, 2.0] (dataset_2d.py:170, 268-272)", low=0.0, high=1.0),
    }
    dataset_defaults = {
        "3d": {"consistency_rampup": 40.0, "conf_threshold": 0.8, "ulb_loss_type": "ce",
               "updating_period": 19},
        "2d": {"consistency_rampup": 50.0, "conf_threshold": 0.95, "ulb_loss_type": "dice",
               "updating_period": 50},
    }

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        # ema_model and ema_model_another: nets of their own, not copies (3d:69-77, 85-87)
        with self.streams.seeded("ad_mt_teachers"):
            self.teacher = build(self.net_name(spec), spec.in_channels, spec.num_classes,
                                 **net_kwargs)
            self.teacher_another = build(self.net_name(spec), spec.in_channels,
                                         spec.num_classes, **net_kwargs)
        for teacher in (self.teacher, self.teacher_another):
            for p in teacher.parameters():
                p.requires_grad_(False)
        # AlternateUpdate(period, initial_flag=True, flag_random) (train_utils.py:12-21)
        self.first_teacher_turn = True
        self.turn_counter = 0
        self.turn_period: int | None = None  # drawn at the first update

    # the alternation's state goes into state_dict (and the engine's checkpoint)
    def get_extra_state(self) -> dict[str, Any]:
        return {"first_teacher_turn": self.first_teacher_turn, "turn_counter": self.turn_counter,
                "turn_period": self.turn_period}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.first_teacher_turn = bool(state["first_teacher_turn"])
        self.turn_counter = int(state["turn_counter"])
        self.turn_period = None if state["turn_period"] is None else int(state["turn_period"])

    def draw_period(self) -> int:
        period = self.hparams["updating_period"]
        if not self.hparams["updating_period_random"]:
            return period
        return int(self.streams.numpy("ad_mt_period").integers(1, period + 1))

    def strong_view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h = self.hparams
        if self.spec.spatial_dims == 3:
            return la_strong_view(x, generator, limit=h["color_limit"], color_p=h["color_p"],
                                  noise_p=h["noise_p"], noise_sigma=(0.1, 1.0))
        jittered = brightness_contrast(x, generator, brightness=h["color_limit"],
                                       contrast=h["color_limit"], p=h["color_p"],
                                       clamp=self.spec.intensity_range)
        return gaussian_blur(jittered, generator, sigma=(0.1, 2.0), p=h["noise_p"])

    def cutmix_plan(self, x: torch.Tensor, cutmix_prob: float):
        """(permutation, box mask) of cut_mix / cut_mix_3d, or None when the cutmix_prob draw
        says no CutMix (the strong view is then the weak one, 3d:261, 277-278)."""
        rng = self.streams.numpy("ad_mt_cutmix")
        if rng.random() >= cutmix_prob:
            return None
        perm = torch.as_tensor(rng.permutation(x.shape[0]), device=x.device)
        return perm, cutmix_boxes_3d_style(x.shape[:1] + x.shape[2:], rng, x.device)

    def train_step(self, batch: Batch, step: int):
        x_u = require_unlabeled(batch, self.name)
        cutmix_prob = self.hparams["cutmix_prob"]  # read in either teacher's turn
        if self.first_teacher_turn:
            views = self.streams.torch("ad_mt_views", x_u.device)
            strong, plan = self.strong_view(x_u, views), None
        else:
            strong, plan = None, self.cutmix_plan(x_u, cutmix_prob)
        return self.loss_of_views(batch.x_labeled, batch.y_labeled, x_u, strong, plan, step)

    def loss_of_views(self, x_l, y_l, x_weak, x_strong, plan, step: int):
        """The step on given views: in the first teacher's turn `x_strong` is the strong view; in
        the second's `plan` (permutation, box mask) CutMixes the weak view, or None: no CutMix."""
        h, first = self.hparams, self.first_teacher_turn
        num_ulb = x_weak.shape[0]
        with torch.no_grad():  # 3d:205-241
            self.teacher.train(first)
            self.teacher_another.train(not first)
            soft_1 = torch.softmax(self.teacher(x_weak).float(), dim=1)
            soft_2 = torch.softmax(self.teacher_another(x_weak).float(), dim=1)
            conf, pseudo, teacher_conflict = ensemble_of_teachers(soft_1, soft_2,
                                                                  h["ensemble_temp"])
        if not first:  # 3d:259-278
            if plan is None:
                x_strong = x_weak.clone()
            else:
                perm, box = plan
                x_strong = mix(x_weak, x_weak[perm], box)
                pseudo, conf = mix(pseudo, pseudo[perm], box), mix(conf, conf[perm], box)
                teacher_conflict = mix(teacher_conflict, teacher_conflict[perm], box)
        n = x_l.shape[0]
        logits = self.student(torch.cat([x_l, x_weak, x_strong]))  # 3d:281-284
        logits_l = logits[:n]
        logits_w, logits_s = logits[n:].chunk(2)
        with torch.no_grad():
            conf_stu, pseudo_stu = torch.max(torch.softmax(logits_w.detach().float(), dim=1), 1)
        sup = supervised_loss(logits_l, y_l, h["dice_include_background"], h["dice_form"])
        threshold = h["conf_threshold"]
        high_ratio = (conf >= threshold).float().mean()
        student_wins_all = None
        if h["conflict_mode"] == "random":
            student_wins_all = bool(self.streams.numpy("ad_mt_conflict").random() < 0.5)
        pseudo, conf = compromise(pseudo, conf, pseudo_stu, conf_stu, h["conflict_mode"],
                                  None if h["conflict_student_use_more"] else teacher_conflict,
                                  student_wins_all)
        confident = conf >= threshold
        weight_conflict = h["conflict_weight"]

        def unlabeled_loss(keep):
            if h["ulb_loss_type"] == "ce":  # 3d:311-335
                return cross_entropy_over(logits_s, torch.where(keep, pseudo, IGNORE))
            # 2d:324-347: the masked Dice of the softmax, every class
            return masked_dice_loss(torch.softmax(logits_s.float(), dim=1), pseudo, "squared",
                                    keep.unsqueeze(1))

        if weight_conflict == 1:
            loss_u = unlabeled_loss(confident)
            loss_consist = loss_conflict = None
        else:  # consistent and conflicting pixels apart (3d:310-330, 2d:323-342)
            loss_consist = unlabeled_loss(confident & ~teacher_conflict)
            loss_u = loss_consist
            if weight_conflict != 0:
                loss_conflict = unlabeled_loss(confident & teacher_conflict)
                loss_u = torch.where(loss_conflict > 0.0,
                                     loss_consist + weight_conflict * loss_conflict,
                                     loss_consist)
        weight = h["consistency"] * epoch_rampup(step, h["rampup_epoch_iterations"],
                                                 h["consistency_rampup"])
        loss = sup["loss_sup"] + weight * loss_u
        logs = {"loss_sup": sup["loss_sup"].detach(), "loss_ulb": loss_u.detach(),
                "cons_weight": weight, "high_ratio": high_ratio,
                "conflict_ratio": teacher_conflict.float().sum() / num_ulb,
                "first_teacher_turn": float(first)}
        if loss_consist is not None:
            logs["loss_ulb_consist"] = loss_consist.detach()
        if loss_conflict is not None:
            logs["loss_ulb_conflict"] = loss_conflict.detach()
        return loss, logs

    def after_optimizer_step(self, step: int) -> None:
        h = self.hparams
        if self.turn_period is None:
            self.turn_period = self.draw_period()
        # update_ema_variables(model, ema, 0.99, iter_num//2): alpha 0 while the step is below
        # consistency_rampup, then min(1 - 1/(step - rampup + 1), decay) (3d:40-53, 350-355)
        teacher = self.teacher if self.first_teacher_turn else self.teacher_another
        ema_step = max(step // h["ema_step_divisor"] - h["consistency_rampup"], 0)
        ema_update(teacher, self.student, h["ema_decay"], ema_step, buffers=True)
        # alternate_indicator.update() (train_utils.py:53-60)
        self.turn_counter += 1
        if self.turn_counter >= self.turn_period:
            self.first_teacher_turn = not self.first_teacher_turn
            self.turn_counter = 0
            self.turn_period = self.draw_period()
