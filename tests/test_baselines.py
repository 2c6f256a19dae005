"""Hand-computed checks of the baseline methods' pieces (Mean Teacher, UA-MT, MC-Net+)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agcl.data.specs import SPECS
from agcl.methods.base import Batch
from agcl.methods.dice import soft_dice_loss
from agcl.methods.ema import ema_update, make_ema_teacher
from agcl.methods.losses import sharpen, softmax_mse
from agcl.methods.registry import get_method, method_module
from agcl.methods.teacher import teacher_noise

McNet, MeanTeacher, UaMt = (get_method(m) for m in ("mc_net", "mean_teacher", "ua_mt"))
mutual_consistency = method_module("mc_net").mutual_consistency
_ua_mt = method_module("ua_mt")
certainty_mask, masked_mse = _ua_mt.certainty_mask, _ua_mt.masked_mse
mean_teacher_probs, uncertainty_threshold = _ua_mt.mean_teacher_probs, _ua_mt.uncertainty_threshold

LN2 = math.log(2)
SHARPEN_06 = 57.6650390625 / 58.6650390625  # 0.6^10 / (0.6^10 + 0.4^10) = 1.5^10 / (1.5^10 + 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------- losses
def test_softmax_mse_on_a_tiny_tensor():
    student = torch.zeros(1, 2, 3)  # softmax -> 0.5, 0.5 everywhere
    teacher = torch.tensor([[[math.log(3)] * 3, [0.0] * 3]])  # softmax -> 0.75, 0.25
    distance = softmax_mse(student, teacher)
    assert distance.shape == (1, 2, 3)
    assert torch.allclose(distance, torch.full((1, 2, 3), 0.0625))
    assert softmax_mse(teacher, teacher).abs().max() == 0


def test_sharpen_values():
    probs = torch.tensor([0.5, 0.6, 0.4, 1.0, 0.0])
    expected = torch.tensor([0.5, SHARPEN_06, 1 - SHARPEN_06, 1.0, 0.0])
    assert torch.allclose(sharpen(probs, 0.1), expected, atol=1e-6)
    # T = 0.5: 0.2^2 / (0.2^2 + 0.8^2) = 0.04 / 0.68 = 1/17
    assert sharpen(torch.tensor(0.2), 0.5).item() == pytest.approx(1 / 17, rel=1e-6)


# ---------------------------------------------------------------------------------- Mean Teacher
def test_teacher_noise_is_clamped_to_0_2():
    torch.manual_seed(0)
    noise = teacher_noise(torch.zeros(20000), std=0.1, clip=0.2)
    assert noise.abs().max().item() == pytest.approx(0.2)
    # P(|N(0, 0.1)| > 0.2) = 4.6 %: clamping really happens, and the spread stays near 0.1.
    assert 0.03 < (noise.abs() == 0.2).float().mean().item() < 0.07
    assert 0.085 < noise.std().item() < 0.1


def test_mean_teacher_noisy_input_uses_the_hparams():
    method = MeanTeacher(SPECS["acdc"], MeanTeacher.hparams_for("acdc", {"noise_std": 5.0}),
                         {"base_features": 2}, 10)
    x = torch.zeros(2, 1, 16, 16)
    torch.manual_seed(0)
    noisy = method.noisy(x)
    assert noisy.abs().max().item() == pytest.approx(0.2)
    assert (noisy.abs() == 0.2).float().mean().item() > 0.9  # std 5 -> almost all clamped


def test_ema_update_values_at_steps_0_1_and_200():
    student = nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.bias.fill_(3.0)
    teacher = make_ema_teacher(student)
    with torch.no_grad():
        teacher.weight.zero_()
        teacher.bias.zero_()
    ema_update(teacher, student, 0.99, step=0)  # alpha = min(1 - 1/1, 0.99) = 0: copy
    assert teacher.weight.tolist() == [[1.0, 2.0]] and teacher.bias.tolist() == [3.0]
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[3.0, 4.0]]))
        student.bias.fill_(5.0)
    ema_update(teacher, student, 0.99, step=1)  # alpha = 0.5
    assert torch.allclose(teacher.weight, torch.tensor([[2.0, 3.0]]))
    ema_update(teacher, student, 0.99, step=200)  # alpha = min(1 - 1/201, 0.99) = 0.99
    assert torch.allclose(teacher.weight, torch.tensor([[0.99 * 2 + 0.01 * 3, 0.99 * 3 + 0.01 * 4]]))
    assert torch.allclose(teacher.bias, torch.tensor([0.99 * 4 + 0.01 * 5]))


def test_mean_teacher_after_optimizer_step_updates_its_teacher_with_decay_0_99():
    method = MeanTeacher(SPECS["acdc"], MeanTeacher.hparams_for("acdc"), {"base_features": 2}, 10)
    method.student = nn.Linear(1, 1)
    method.teacher = make_ema_teacher(method.student)
    with torch.no_grad():
        method.student.weight.fill_(1.0)
        method.teacher.weight.fill_(0.0)
    method.after_optimizer_step(500)
    assert method.teacher.weight.item() == pytest.approx(0.01)
    assert method.student.weight.item() == 1.0


def _fixed_nets(method):
    """Student logits [x, 0] and teacher logits [0, 0] per pixel: no BatchNorm, no dropout."""
    student, teacher = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
        student.bias.zero_()
        teacher.weight.zero_()
        teacher.bias.zero_()
    method.student, method.teacher = student, teacher.requires_grad_(False)


@pytest.mark.parametrize("method_cls, extra", [(MeanTeacher, {}),
                                               (UaMt, {"threshold_ceiling": 1.0})])
def test_consistency_is_softmax_mse_on_the_unlabeled_part_only(method_cls, extra):
    hparams = method_cls.hparams_for("crag", {"noise_std": 0.0, **extra})
    method = method_cls(SPECS["acdc"], hparams, {"base_features": 2}, 100)
    _fixed_nets(method)
    # Labeled pixels give the student 0.5/0.5 (= the teacher), unlabeled ones 0.75/0.25.
    batch = Batch(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                  torch.full((2, 1, 2, 2), math.log(3)))
    loss, logs = method.train_step(batch, 0)
    logs = {k: float(v) for k, v in logs.items()}
    assert logs["loss_cons"] == pytest.approx(0.0625)
    assert logs["cons_weight"] == pytest.approx(0.1 * math.exp(-5))
    assert loss.item() == pytest.approx(logs["loss_sup"] + 0.1 * math.exp(-5) * 0.0625)
    if method_cls is UaMt:  # uniform teacher: entropy ln 2 - 1.4e-6 < ceiling 1.0 everywhere
        assert logs["mask_fraction"] == 1.0


@pytest.mark.parametrize("dataset, step, expected", [
    ("la", 0, 0.1 * math.exp(-5)),
    ("la", 149, 0.1 * math.exp(-5)),  # still "epoch" 0
    ("la", 150 * 40, 0.1),  # end of the 40-epoch ramp (UA-MT LA)
    ("acdc", 150 * 40, 0.1 * math.exp(-5 * 0.8**2)),  # 40 of 200 epochs (SSL4MIS)
    ("crag", 150 * 200, 0.1),
])
def test_mean_teacher_consistency_weight_ramp(dataset, step, expected):
    from agcl.methods.teacher import consistency_weight

    assert consistency_weight(MeanTeacher.hparams_for(dataset), step) == pytest.approx(expected)


# ---------------------------------------------------------------------------------- UA-MT
def test_uncertainty_threshold_at_start_and_end():
    assert uncertainty_threshold(0, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2)
    assert uncertainty_threshold(0, 6000) == pytest.approx(0.5210279826612536)
    assert uncertainty_threshold(6000, 6000) == pytest.approx(LN2)
    assert uncertainty_threshold(3000, 6000) == pytest.approx(
        (0.75 + 0.25 * math.exp(-5 * 0.25)) * LN2)


def test_certainty_mask_on_hand_made_probabilities():
    # Foreground probability per voxel; entropies (with the +1e-6 of UA-MT):
    # 0.5 -> 0.693145, 0.9 -> 0.325081, 0.8 -> 0.500400, 0.75 -> 0.562333
    fg = torch.tensor([0.5, 0.9, 0.8, 0.75])
    probs = torch.stack([1 - fg, fg]).unsqueeze(0)  # (1, 2, 4)
    start = certainty_mask(probs, uncertainty_threshold(0, 100))  # threshold 0.5210
    assert start.shape == (1, 1, 4)
    assert start.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]
    assert certainty_mask(probs, 0.6).flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    distance = torch.arange(1.0, 9.0).view(1, 2, 4)  # [[1, 2, 3, 4], [5, 6, 7, 8]]
    # (2 + 3 + 6 + 7) / (2 * 2)
    assert masked_mse(distance, start).item() == pytest.approx(4.5)
    assert masked_mse(distance, torch.zeros(1, 1, 4)).item() == 0.0


class _CountingTeacher(nn.Module):
    """Deterministic logits [x, -x]; counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.cat([x, -x], dim=1)


@pytest.mark.parametrize("per_forward, expected_calls", [(1, 8), (2, 4), (8, 1)])
def test_stochastic_passes_are_batched_and_regrouped_per_sample(per_forward, expected_calls):
    teacher = _CountingTeacher()
    x = torch.tensor([0.0, 1.0, -2.0]).view(3, 1, 1)  # three distinct samples
    mean = mean_teacher_probs(teacher, x, passes=8, passes_per_forward=per_forward,
                              noise_std=0.0, noise_clip=0.2)
    assert teacher.calls == expected_calls
    assert torch.allclose(mean, torch.softmax(torch.cat([x, -x], dim=1), dim=1))
    with pytest.raises(ValueError, match="multiple of passes_per_forward"):
        mean_teacher_probs(teacher, x, passes=8, passes_per_forward=3, noise_std=0.0,
                           noise_clip=0.2)


def test_ua_mt_teacher_passes_run_with_dropout_on():
    method = UaMt(SPECS["la"], UaMt.hparams_for("la"), {"n_filters": 2}, 100).train()
    x = torch.randn(2, 1, 16, 16, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = method.teacher(x), method.teacher(x)
    assert method.teacher.training
    assert not torch.equal(first, second)  # Dropout3d draws a new mask each pass


# ---------------------------------------------------------------------------------- MC-Net+
def test_mutual_consistency_on_a_hand_made_pair():
    p1 = torch.tensor([0.6, 0.4]).view(1, 2, 1)
    p2 = torch.tensor([0.5, 0.5]).view(1, 2, 1)
    # MSE(p1, sharpen(p2)) = 0.1^2; MSE(p2, sharpen(p1)) = mean((0.5 - s)^2, (0.5 - (1 - s))^2)
    expected = 0.01 + (0.5 - SHARPEN_06) ** 2
    assert mutual_consistency([p1, p2], 0.1, detach_targets=True).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.2432446361878689)


def test_mutual_consistency_gradient_with_and_without_detached_targets():
    p1 = torch.tensor([0.6, 0.4]).view(1, 2, 1).requires_grad_()
    p2 = torch.tensor([0.5, 0.5]).view(1, 2, 1)
    mutual_consistency([p1, p2], 0.1, detach_targets=True).backward()
    # Only MSE(p1, sharpen(p2)) reaches p1: d/dp1 mean((p1 - 0.5)^2) = (p1 - 0.5) (2 elements)
    assert torch.allclose(p1.grad.flatten(), torch.tensor([0.1, -0.1]))
    p1.grad = None
    mutual_consistency([p1, p2], 0.1, detach_targets=False).backward()
    assert not torch.allclose(p1.grad.flatten(), torch.tensor([0.1, -0.1]))  # through sharpen


def test_mc_net_uses_mcnet_and_infers_with_the_first_decoder():
    assert McNet.net_name(SPECS["la"]) == "mcnet3d"
    assert McNet.net_name(SPECS["acdc"]) == McNet.net_name(SPECS["crag"]) == "mcnet2d"
    method = McNet(SPECS["acdc"], McNet.hparams_for("acdc"), {"base_features": 2}, 100).eval()
    assert method.student.num_decoders == 3
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(method.inference_net()(x), method.student.forward_all(x)[0])


def test_mc_net_dice_is_summed_over_decoders_on_the_labeled_part():
    hparams = McNet.hparams_for("la")
    method = McNet(SPECS["la"], hparams, {"n_filters": 2, "has_dropout": False}, 100).eval()
    torch.manual_seed(0)
    batch = Batch(torch.randn(2, 1, 16, 16, 16), torch.randint(0, 2, (2, 16, 16, 16)),
                  torch.randn(2, 1, 16, 16, 16))
    loss, logs = method.train_step(batch, 149)
    logs = {k: float(v) for k, v in logs.items()}
    with torch.no_grad():
        outputs = method.student.forward_all(torch.cat([batch.x_labeled, batch.x_unlabeled]))
    # MC-Net 3D: Binary_dice_loss, linear denominators, foreground only
    dice_sum = sum(soft_dice_loss(o[:2], batch.y_labeled, False, "linear") for o in outputs)
    assert logs["loss_dice"] == pytest.approx(dice_sum.item(), rel=1e-5)
    assert logs["loss_sup"] == pytest.approx(0.5 * dice_sum.item(), rel=1e-5)  # --lamda 0.5
    # MC-Net ramps on (iter + 1) // 150: step 149 is already "epoch" 1 of 40.
    assert logs["cons_weight"] == pytest.approx(math.exp(-5 * (1 - 1 / 40) ** 2))
    assert loss.item() == pytest.approx(logs["loss_sup"] + logs["cons_weight"] * logs["loss_mc"],
                                        rel=1e-5)
