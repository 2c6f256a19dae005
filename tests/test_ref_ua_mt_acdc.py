"""UA-MT on ACDC against its reference code, HiLab-git/SSL4MIS
code/train_uncertainty_aware_mean_teacher_2D.py (cited script:N), whose loop lines run as the
script runs them: the script is imported as a module (argparse at its defaults, so its own
`args`, `get_current_consistency_weight` and `update_ema_variables`), and its training-loop body
(script:149-197, from reading the batch to the EMA update) is read from its text and executed
in float32 on the same tensors as our method's train_step, the engine's SGD and our EMA update.

Bridged, not changed: `.cuda()` is the identity (CPU); torchvision, tensorboardX and cv2 are
stubs and networks.net_factory a stand-in (the test hands the loop its nets); the script's
torch.randn_like draws (the teacher's input noise, then the T/2 = 4 uncertainty passes) and
ours (torch.randn inside our own teacher_noise, so that its scaling and clipping run) return the
same pre-drawn standard normals in the same order, so torch's global RNG (the U-Net's dropout)
is consumed alike. Our teacher batches the script's 2 passes per forward (`passes_per_forward:
2`; ours defaults to 8 in one forward, which changes only the teacher's BatchNorm batch
statistics). Compared: the loss, the supervised and consistency terms, the consistency weight,
the uncertainty threshold and mask, every gradient of the student, then the student's weights
and BatchNorm statistics after SGD and the teacher's after the EMA update, at iterations 0 (both
ramps at their start), 15000 (both ramps, over 200 x 150 = 30000 iterations, mid-way) and 30000
(both at 1), at ACDC's 4 classes with SSL4MIS's full-width U-Net on 64x64 slices.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.nn.modules.loss import CrossEntropyLoss

from agcl.data.specs import SPECS
from agcl.methods import Batch
from agcl.methods.ema import ema_update
from agcl.methods.registry import get_method
from tests.reference_code import (
    SameNormals,
    assert_same_update,
    import_ssl4mis_2d_script,
    reference_source,
    script_lines,
)
from tests.test_ref_ss_net import unet_renamer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "HiLab-git/SSL4MIS", "train_uncertainty_aware_mean_teacher_2D"
SIZE, NUM_CLASSES, LABELED_BS = (64, 64), 4, 2  # ACDC's classes; 2 + 2 slices small for CPU
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture
def script(monkeypatch):
    return import_ssl4mis_2d_script(monkeypatch, SCRIPT)


def loop_body() -> str:
    """The script's loop body from reading the batch to the EMA update (script:149-197)."""
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "update_ema_variables(model, ema_model, args.ema_decay, iter_num)")


@pytest.mark.parametrize("iter_num", [0, 15000, 30000])
def test_one_step_equals_the_scripts_loop(script, monkeypatch, iter_num):
    module, unet = script
    args = module.args
    args.labeled_bs = LABELED_BS
    torch.manual_seed(0)
    model = unet.UNet(in_chns=1, class_num=NUM_CLASSES)  # create_model() (script:98-108)
    ema_model = unet.UNet(in_chns=1, class_num=NUM_CLASSES)
    for param in ema_model.parameters():
        param.detach_()
    with torch.no_grad():  # a teacher certain on part of the slice: a mask neither 0 nor 1
        ema_model.decoder.out_conv.weight.mul_(30)
    cls = get_method("ua_mt")
    hparams = cls.hparams_for("acdc", {"passes_per_forward": 2})  # the script's 2 per forward
    method = cls(SPECS["acdc"], hparams, {}, args.max_iterations)
    rename = unet_renamer(list(method.student.state_dict()))
    method.student.load_state_dict(rename(model.state_dict()))
    method.teacher.load_state_dict(rename(ema_model.state_dict()))
    model.train(), ema_model.train(), method.train()  # script:129 (the EMA net never leaves it)

    gen = torch.Generator().manual_seed(1 + iter_num)
    volume_batch = torch.randn(2 * LABELED_BS, 1, *SIZE, generator=gen)
    label_batch = torch.randint(0, NUM_CLASSES, (2 * LABELED_BS, *SIZE), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # script:134-135
    namespace = {**vars(module), "args": args, "model": model, "ema_model": ema_model,
                 "optimizer": optimizer, "iter_num": iter_num, "num_classes": args.num_classes,
                 "max_iterations": args.max_iterations, "ce_loss": CrossEntropyLoss(),
                 "dice_loss": module.losses.DiceLoss(args.num_classes),  # script:93-137
                 "sampled_batch": {"image": volume_batch, "label": label_batch}}
    noise = SameNormals(seed=iter_num)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn_like", noise.randn_like)
        torch.manual_seed(7)  # dropout masks, drawn in the same order in both
        exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn", noise.randn)  # inside our teacher_noise only
        torch.manual_seed(7)
        loss, logs = method.train_step(
            Batch(volume_batch[:LABELED_BS], label_batch[:LABELED_BS], volume_batch[LABELED_BS:]),
            iter_num)
    assert noise.served == {"theirs": 5, "ours": 5}  # 1 teacher input + T/2 = 4 passes

    torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
    torch.testing.assert_close(logs["loss_sup"], namespace["supervised_loss"], **CLOSE)
    torch.testing.assert_close(logs["loss_ce"], namespace["loss_ce"], **CLOSE)
    torch.testing.assert_close(logs["loss_dice"], namespace["loss_dice"], **CLOSE)
    torch.testing.assert_close(logs["loss_cons"], namespace["consistency_loss"], **CLOSE)
    assert logs["cons_weight"] == pytest.approx(namespace["consistency_weight"], rel=1e-15)
    assert logs["uncertainty_threshold"] == pytest.approx(namespace["threshold"], rel=1e-15)
    assert float(logs["mask_fraction"]) == float(namespace["mask"].mean())
    assert 0.05 < float(logs["mask_fraction"]) < 0.95, float(logs["mask_fraction"])
    if iter_num == 15000:  # both ramps mid-way
        assert 0.2 < namespace["consistency_weight"] / args.consistency < 0.8
        assert 0.76 * 0.6931 < namespace["threshold"] < 0.99 * 0.6931

    # the engine's SGD (the unified SGD constants are the script's) and our EMA update
    assert_same_update(method, loss, rename, model, ema_model, lr=args.base_lr, step=iter_num)


def test_the_hyperparameters_are_the_scripts(script):
    """Every constant our ACDC UA-MT reads, from the script (argparse defaults and literals)."""
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    hparams = get_method("ua_mt").hparams_for("acdc", {})
    assert (hparams["ema_decay"], hparams["consistency"], hparams["consistency_rampup"]) == (
        args.ema_decay, args.consistency, args.consistency_rampup) == (0.99, 0.1, 200.0)
    assert "consistency_weight = get_current_consistency_weight(iter_num//150)" in text
    assert hparams["rampup_epoch_iterations"] == 150
    assert hparams.get("consistency_start", 0) == 0  # no silent start in this script
    assert "if iter_num < 1000" not in text
    assert re.search(r"\n\s*T = (\d+)\n", text).group(1) == str(hparams["uncertainty_passes"])
    assert "volume_batch_r = unlabeled_volume_batch.repeat(2, 1, 1, 1)" in text  # 2 per forward
    assert hparams["uncertainty_passes"] % 2 == 0
    assert text.count("torch.clamp(torch.randn_like(") == 2
    assert "torch.randn_like(\n                unlabeled_volume_batch) * 0.1, -0.2, 0.2)" in text
    assert "torch.randn_like(\n                        volume_batch_r) * 0.1, -0.2, 0.2)" in text
    assert (hparams["noise_std"], hparams["noise_clip"]) == (0.1, 0.2)
    assert "threshold = (0.75+0.25*ramps.sigmoid_rampup(iter_num,\n" \
           "                                                        max_iterations))*np.log(2)" \
        in text
    assert hparams["threshold_floor"] == 0.75
    assert hparams["threshold_ceiling"] == pytest.approx(float(module.np.log(2)), rel=1e-15)
    assert "torch.sum(preds*torch.log(preds + 1e-6), dim=1, keepdim=True)" in text
    assert "mask*consistency_dist)/(2*torch.sum(mask)+1e-16)" in text
    # 0.5 (Dice + CE), the Dice over every class (losses.DiceLoss(num_classes)), 4 classes
    assert "supervised_loss = 0.5 * (loss_dice + loss_ce)" in text
    assert hparams["dice_include_background"] and args.num_classes == SPECS["acdc"].num_classes
    assert "momentum=0.9, weight_decay=0.0001)" in text and args.base_lr == 0.01
    # the script's own EMA warm-up: alpha = min(1 - 1/(step + 1), decay), parameters only
    student, teacher, copy = (torch.nn.Linear(2, 2) for _ in range(3))
    copy.load_state_dict(teacher.state_dict())
    for step in (0, 5, 500):
        module.update_ema_variables(student, teacher, args.ema_decay, step)
        ema_update(copy, student, hparams["ema_decay"], step)
        assert torch.equal(copy.weight, teacher.weight)
