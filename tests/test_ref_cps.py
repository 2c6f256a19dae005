"""Cross pseudo supervision against its reference code, HiLab-git/SSL4MIS
code/train_cross_pseudo_supervision_2D.py (cited script:N): the script imported as a module
(argparse at its defaults: its own `args` and `get_current_consistency_weight`), and the body of
its training loop (script:171-204, from reading the batch to both optimisers' steps) read from
its text and executed on the same tensors as our method's train_step and the engine's optimiser
over our two TrainedNetworks. Two consecutive steps, so that SGD's momentum and weight decay show,
at iterations 0 (ramp at its start), 3000 (inside the ramp) and 30000 (after it), at ACDC's 4
classes with SSL4MIS's full-width U-Net on 64x64 slices. Compared: both nets' losses, the total,
every gradient of both nets, and both nets' weights and BatchNorm statistics after each step.

Bridged, not changed: `.cuda()` is the identity; torchvision, tensorboardX and cv2 are stubs and
networks.net_factory a stand-in (the loop gets its nets from the test).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.loss import CrossEntropyLoss

from agcl.data.specs import SPECS
from agcl.engine.optimizers import main_optimizer
from agcl.methods import Batch
from agcl.methods.registry import get_method
from tests.reference_code import (
    assert_close_by_name,
    import_ssl4mis_2d_script,
    reference_source,
    script_lines,
)
from tests.test_ref_ss_net import unet_renamer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "HiLab-git/SSL4MIS", "train_cross_pseudo_supervision_2D"
SIZE, NUM_CLASSES = (64, 64), 4  # ACDC's classes, slices small enough for CPU
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture
def script(monkeypatch):
    return import_ssl4mis_2d_script(monkeypatch, SCRIPT)


def loop_body() -> str:
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "optimizer2.step()")


@pytest.mark.parametrize("iter_num", [0, 3000, 30000])
def test_two_steps_equal_the_scripts_loop(script, iter_num):
    module, unet = script
    args = module.args
    args.labeled_bs = 2
    torch.manual_seed(0)
    model1 = unet.UNet(in_chns=1, class_num=NUM_CLASSES)  # create_model() twice (script:124-125)
    model2 = unet.UNet(in_chns=1, class_num=NUM_CLASSES)
    cls = get_method("cps")
    method = cls(SPECS["acdc"], cls.hparams_for("acdc", {}), {}, args.max_iterations)
    rename = unet_renamer(list(method.student.state_dict()))
    method.student.load_state_dict(rename(model1.state_dict()))
    method.peer.load_state_dict(rename(model2.state_dict()))
    model1.train(), model2.train(), method.train()
    optimizer1 = torch.optim.SGD(model1.parameters(), lr=args.base_lr, momentum=0.9,
                                 weight_decay=0.0001)  # script:153-156
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=args.base_lr, momentum=0.9,
                                 weight_decay=0.0001)
    # the engine's optimiser over the two TrainedNetworks, at the train block's SGD settings
    ours_optimizer = main_optimizer(method, {"lr": args.base_lr, "momentum": 0.9,
                                             "weight_decay": 0.0001})
    namespace = {**vars(module), "args": args, "model1": model1, "model2": model2,
                 "optimizer1": optimizer1, "optimizer2": optimizer2,
                 "ce_loss": CrossEntropyLoss(), "dice_loss": module.losses.DiceLoss(NUM_CLASSES)}
    gen = torch.Generator().manual_seed(iter_num)
    for step in (iter_num, iter_num + 1):
        volume_batch = torch.randn(4, 1, *SIZE, generator=gen)
        label_batch = torch.randint(0, NUM_CLASSES, (4, *SIZE), generator=gen)
        namespace.update(iter_num=step,
                         sampled_batch={"image": volume_batch, "label": label_batch})
        torch.manual_seed(7)  # the U-Net's dropout, alike on both sides
        exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned)

        torch.manual_seed(7)
        loss, logs = method.train_step(
            Batch(volume_batch[:2], label_batch[:2], volume_batch[2:]), step)
        torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
        torch.testing.assert_close(logs["model1_loss"], namespace["model1_loss"], **CLOSE)
        torch.testing.assert_close(logs["model2_loss"], namespace["model2_loss"], **CLOSE)
        assert logs["cons_weight"] == pytest.approx(namespace["consistency_weight"], rel=1e-15)
        ours_optimizer.zero_grad()
        loss.backward()
        for ours, theirs, what in ((method.student, model1, "model1"),
                                   (method.peer, model2, "model2")):
            assert_close_by_name({n: p.grad for n, p in ours.named_parameters()},
                                 rename({n: p.grad for n, p in theirs.named_parameters()}),
                                 f"{what} grad")
        ours_optimizer.step()
        for ours, theirs, what in ((method.student, model1, "model1"),
                                   (method.peer, model2, "model2")):
            assert_close_by_name(ours.state_dict(), rename(theirs.state_dict()), what)
            # Equal to float32 rounding is not bit-equal: a hard pseudo-label of a near-tie
            # pixel flips on such a difference. The next step starts from the reference's
            # weights (in place: our optimiser's momentum buffers stay ours).
            ours.load_state_dict(rename(theirs.state_dict()))
    if iter_num == 3000:
        assert 0 < namespace["consistency_weight"] < args.consistency


def test_the_hyperparameters_are_the_scripts(script):
    """The constants our CPS takes from the script (argparse defaults, literals)."""
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    hparams = get_method("cps").hparams_for("acdc", {})
    assert (hparams["consistency"], hparams["consistency_rampup"]) == (
        args.consistency, args.consistency_rampup)
    assert "get_current_consistency_weight(iter_num // 150)" in text
    assert hparams["rampup_epoch_iterations"] == 150
    assert hparams["dice_include_background"]  # losses.DiceLoss(num_classes): every class
    assert text.count("momentum=0.9, weight_decay=0.0001)") == 2 and args.base_lr == 0.01
    # the lr is set after the step from the step just taken: the reference protocol's poly_lagged
    assert "iter_num = iter_num + 1\n\n            lr_ = base_lr * (1.0 - iter_num / " \
           "max_iterations) ** 0.9" in text


def test_cps_says_it_cannot_train_a_3d_dataset():
    assert "unet_3D" in get_method("cps").unsupported(SPECS["la"])
    assert get_method("cps").unsupported(SPECS["acdc"]) is None
