"""Mean Teacher on LA against the code it follows: yulequan/UA-MT
code/train_LA_meanteacher_certainty_unlabel.py (cited script:N) with its uncertainty mask
removed, i.e. UA-MT's own Mean Teacher.

Which reference. The UA-MT repository has no plain Mean Teacher script for LA; it has
train_LA_meanteacher_certainty.py (teacher noise on the whole batch, consistency on all four
volumes) and train_LA_meanteacher_certainty_unlabel.py (noise and consistency on the unlabeled
half only); SSL4MIS's code/train_mean_teacher_3D.py trains BraTS with a 3D U-Net,
--consistency_rampup 200, a Dice over both classes (DiceLoss(2)) and a poly lr over 30000
iterations. Our LA Mean Teacher is none of SSL4MIS's: V-Net, --consistency_rampup 40, a
foreground-only Dice (UA-MT's losses.dice_loss on class 1), UA-MT's 6000 iterations at batch 4
(2 labeled) with lr x0.1 every 2500 (config/reference.yaml), teacher noise and consistency on the
unlabeled half: UA-MT's `_unlabel` script with every voxel counted (the mask all ones; then
sum(mask * d) / (2 sum(mask)) is the mean of d over its two classes, Mean Teacher's
softmax-MSE). test_the_reference_is_uamts_unlabel_script pins each of these facts.

How it runs. The script is imported as a module (argparse at its defaults: its own `args`,
`get_current_consistency_weight`, `update_ema_variables`), and its loop body (script:142-182,
from reading the batch to the EMA update) is read from its text and executed, less two things
that are the uncertainty estimate and nothing else: the T = 8 noisy teacher passes and the
entropy (script:151-162, whose forwards would also move the teacher's BatchNorm statistics) are
cut out, and the mask line (script:174) reads `mask = torch.ones_like(uncertainty)` with
`uncertainty` of the mask's shape (B, 1, ...). Every other line runs as written, on the same
tensors as our method's train_step, the engine's SGD and our EMA update.

Bridged, not changed: `.cuda()` is the identity (CPU); tensorboardX and torchvision are stubs;
the script's one torch.randn_like draw (the teacher's input noise) and ours (torch.randn inside
our teacher_noise, whose scaling and clipping run) return the same standard normals, so torch's
global RNG (the V-Net's dropout) is consumed alike. Compared: the loss, the supervised and
consistency terms, the consistency weight, every student gradient, then the student's weights
and BatchNorm statistics after SGD and the teacher's after the EMA update, at iterations 0 (ramp
start, the EMA copies the student) and 3000 (ramp mid-way, 20 of 40 epochs of 150), with the
reference V-Net at width 2 on the script's 112x112x80 patch.
"""

from __future__ import annotations

import re

import pytest
import torch

from agcl.config import load_config
from agcl.config.load import dataset_config, method_train_config
from agcl.data.specs import SPECS
from agcl.methods import Batch
from agcl.methods.ema import ema_update
from agcl.methods.registry import get_method
from tests.reference_code import (
    REPO_ROOT,
    SameNormals,
    assert_same_update,
    import_script,
    reference_source,
    script_lines,
)
from tests.test_ref_ua_mt import N_FILTERS, PATCH, STUBS, ours_named

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "yulequan/UA-MT", "train_LA_meanteacher_certainty_unlabel"
CLOSE = {"rtol": 1e-5, "atol": 1e-7}
UNCERTAINTY_FIRST, UNCERTAINTY_LAST = "T = 8\n", "## calculate the loss"
MASK_LINE = "mask = (uncertainty<threshold).float()"


def reference_hparams() -> dict:
    """config/reference.yaml's hparams for mean_teacher on LA."""
    config = load_config(REPO_ROOT / "config" / "reference.yaml")
    return dataset_config(config, "la").get("hparams", {}).get("mean_teacher", {})


@pytest.fixture
def script(monkeypatch):
    return import_script(monkeypatch, REPO, SCRIPT, "networks.vnet", stubs=STUBS)


def loop_body() -> str:
    """The script's loop body (script:142-182) without its uncertainty estimate (script:151-162)
    and with every voxel certain (script:174)."""
    body = script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "update_ema_variables(model, ema_model, args.ema_decay, iter_num)")
    start = body.rindex("\n", 0, body.index(UNCERTAINTY_FIRST)) + 1
    end = body.rindex("\n", 0, body.index(UNCERTAINTY_LAST)) + 1
    cut = body[start:end]
    # what is cut assigns only the uncertainty estimate's names, nothing the rest reads but
    # `uncertainty`, which the mask line below no longer compares
    assignment = r"^\s*([A-Za-z_]\w*)(?:\[[^\]]*\])?\s*=[^=]"
    assigned = set(re.findall(assignment, cut, re.MULTILINE))
    assert assigned == {"T", "volume_batch_r", "stride", "preds", "ema_inputs", "uncertainty"}
    rest = body[:start] + body[end:]
    for name in assigned - {"uncertainty"}:
        assert not re.search(rf"\b{name}\b", body[end:]), name
    assert rest.count(MASK_LINE) == 1 and rest.count("uncertainty") == 1
    certain = ("uncertainty = torch.zeros_like(consistency_dist[:, :1])\n"
               + " " * (len(rest[:rest.index(MASK_LINE)].rsplit("\n", 1)[1]))
               + "mask = torch.ones_like(uncertainty)")
    return rest.replace(MASK_LINE, certain)


@pytest.mark.parametrize("iter_num", [0, 3000])
def test_one_step_equals_the_scripts_loop_without_its_mask(script, monkeypatch, iter_num):
    module, vnet = script
    args = module.args
    torch.manual_seed(0)
    model = vnet.VNet(n_channels=1, n_classes=module.num_classes, n_filters=N_FILTERS,
                      normalization="batchnorm", has_dropout=True)  # create_model() (script:87-97)
    ema_model = vnet.VNet(n_channels=1, n_classes=module.num_classes, n_filters=N_FILTERS,
                          normalization="batchnorm", has_dropout=True)
    for param in ema_model.parameters():
        param.detach_()
    cls = get_method("mean_teacher")
    hparams = cls.hparams_for("la", reference_hparams())
    method = cls(SPECS["la"], hparams, {"n_filters": N_FILTERS}, args.max_iterations)
    method.student.load_state_dict(ours_named(model.state_dict()))
    method.teacher.load_state_dict(ours_named(ema_model.state_dict()))
    model.train(), ema_model.train(), method.train()  # script:119-120

    gen = torch.Generator().manual_seed(1 + iter_num)
    volume_batch = torch.randn(args.batch_size, 1, *PATCH, generator=gen)
    label_batch = (volume_batch[:, 0] > 0.3).long()
    labeled_bs = module.labeled_bs
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # script:121
    namespace = {**vars(module), "model": model, "ema_model": ema_model,
                 "optimizer": optimizer, "iter_num": iter_num,
                 "sampled_batch": {"image": volume_batch, "label": label_batch},
                 "consistency_criterion": module.losses.softmax_mse_loss}  # script:123-124
    noise = SameNormals(seed=iter_num)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn_like", noise.randn_like)
        torch.manual_seed(7)  # dropout masks, drawn in the same order in both
        exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn", noise.randn)  # inside our teacher_noise only
        torch.manual_seed(7)
        loss, logs = method.train_step(
            Batch(volume_batch[:labeled_bs], label_batch[:labeled_bs], volume_batch[labeled_bs:]),
            iter_num)
    assert noise.served == {"theirs": 1, "ours": 1}  # the teacher's input noise only

    assert float(namespace["mask"].mean()) == 1.0
    torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
    torch.testing.assert_close(logs["loss_sup"], namespace["supervised_loss"], **CLOSE)
    torch.testing.assert_close(logs["loss_ce"], namespace["loss_seg"], **CLOSE)
    torch.testing.assert_close(logs["loss_dice"], namespace["loss_seg_dice"], **CLOSE)
    torch.testing.assert_close(logs["loss_cons"], namespace["consistency_dist"], **CLOSE)
    assert logs["cons_weight"] == pytest.approx(namespace["consistency_weight"], rel=1e-15)
    if iter_num == 3000:
        assert 0.2 < namespace["consistency_weight"] / args.consistency < 0.8

    assert_same_update(method, loss, ours_named, model, ema_model, lr=args.base_lr,
                       step=iter_num)


def test_the_reference_is_uamts_unlabel_script(script):
    """The constants our LA Mean Teacher reads, with the reference protocol's recipe, are UA-MT's
    `_unlabel` script's, and not SSL4MIS's 3D Mean Teacher's."""
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    hparams = get_method("mean_teacher").hparams_for("la", reference_hparams())
    assert (hparams["ema_decay"], hparams["consistency"], hparams["consistency_rampup"]) == (
        args.ema_decay, args.consistency, args.consistency_rampup) == (0.99, 0.1, 40.0)
    assert get_method("mean_teacher").hparams_for("la", {})["consistency_rampup"] == 40.0
    assert "consistency_weight = get_current_consistency_weight(iter_num//150)" in text
    assert hparams["rampup_epoch_iterations"] == 150 and hparams["consistency_start"] == 0
    # noise and consistency on the unlabeled half (the `_unlabel` script, not `certainty.py`)
    assert "noise = torch.clamp(torch.randn_like(unlabeled_volume_batch) * 0.1, -0.2, 0.2)" \
        in text and (hparams["noise_std"], hparams["noise_clip"]) == (0.1, 0.2)
    assert "consistency_criterion(outputs[labeled_bs:], ema_output)" in text
    other = reference_source(REPO, "train_LA_meanteacher_certainty.py")
    assert "consistency_criterion(outputs, ema_output)" in other
    # 0.5 (CE + Dice), the Dice on the foreground only, squared denominators
    assert "loss_seg_dice = losses.dice_loss(outputs_soft[:labeled_bs, 1, :, :, :], " \
           "label_batch[:labeled_bs] == 1)" in text
    assert "supervised_loss = 0.5*(loss_seg+loss_seg_dice)" in text
    assert not hparams["dice_include_background"] and hparams["dice_form"] == "squared"
    assert "y_sum = torch.sum(target * target)" in reference_source(REPO, "utils/losses.py")
    # the reference protocol's LA recipe is the script's (script:28-31, 121, 239-240)
    config = load_config(REPO_ROOT / "config" / "reference.yaml")
    train = method_train_config(dataset_config(config, "la"), "mean_teacher")
    assert (train["iterations"], train["batch_size"], train["labeled_batch_size"],
            train["lr"]) == (args.max_iterations, args.batch_size, args.labeled_bs,
                             args.base_lr) == (6000, 4, 2, 0.01)
    assert (train["schedule"], train["step_size"], train["gamma"]) == ("step", 2500, 0.1)
    assert "if iter_num % 2500 == 0:\n                lr_ = base_lr * 0.1 ** (iter_num // 2500)" \
        in text
    assert (train["momentum"], train["weight_decay"]) == (0.9, 0.0001)
    assert "momentum=0.9, weight_decay=0.0001)" in text
    assert list(train["patch"]) == list(module.patch_size) == list(PATCH)
    assert SPECS["la"].default_net.startswith("vnet") and "from networks.vnet import VNet" in text
    # SSL4MIS's 3D Mean Teacher differs from ours in its ramp and Dice (so it is not the one)
    ssl4mis = reference_source("HiLab-git/SSL4MIS", "train_mean_teacher_3D.py")
    assert "default=200.0, help='consistency_rampup')" in ssl4mis
    assert "dice_loss = losses.DiceLoss(2)" in ssl4mis and "unet_3D" in ssl4mis
    # the script's own EMA warm-up: alpha = min(1 - 1/(step + 1), decay), parameters only
    student, teacher, copy = (torch.nn.Linear(2, 2) for _ in range(3))
    copy.load_state_dict(teacher.state_dict())
    for step in (0, 5, 500):
        module.update_ema_variables(student, teacher, args.ema_decay, step)
        ema_update(copy, student, hparams["ema_decay"], step)
        assert torch.equal(copy.weight, teacher.weight)
