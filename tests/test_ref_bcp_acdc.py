"""BCP on ACDC against its reference code, DeepMed-Lab-ECNU/BCP code/ACDC_BCP_train.py (cited
script:N): the script imported as a module (argparse at its defaults: its own `args`,
`generate_mask`, `mix_loss`, `get_ACDC_masks`, `update_model_ema`, `dice_loss`), and the bodies
of its two loops, pre_train's (script:237-255) and self_train's (script:354-390), executed on the
same tensors as our bcp's train_step in each stage, the engine's SGD and our EMA update; its
UNet_2d mapped into ours. Two consecutive steps of each stage (momentum and weight decay show),
4 classes on 64 x 64 slices, batch 8 (4 labeled); in self-training the teacher is perturbed so
that its pseudo-labels hold every class in many pieces (get_ACDC_masks(nms=1) matters).
Compared: the loss, every gradient, the weights and BatchNorm statistics after the step, and in
self-training the teacher's after the EMA update (whole state_dict, decay 0.99).

Bridged, not changed: `.cuda()` is the identity; modules the loops never use (tensorboardX,
torchvision, cv2, imageio, matplotlib, the dataset, net-factory, memory, contrastive and
validation modules) are stubs; the box corner that generate_mask draws with np.random.randint is
the one our "box_mask" stream returns (the same two integers in the same order).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from agcl.data.specs import SPECS
from agcl.methods import Batch
from agcl.methods.registry import get_method
from tests.reference_code import (
    assert_close_by_name,
    import_script,
    reference_source,
    script_lines,
    teacher_in_pieces,
)
from tests.test_ref_bcp import Corners
from tests.test_ref_ss_net import unet_renamer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "DeepMed-Lab-ECNU/BCP", "ACDC_BCP_train"
STUBS = ("tensorboardX", "torchvision", "torchvision.transforms", "cv2", "imageio",
         "matplotlib", "matplotlib.pyplot", "dataloaders.dataset", "networks.net_factory",
         "utils.feature_memory", "utils.contrastive_losses", "utils.val_2d")
SIZE, NUM_CLASSES, BATCH, LABELED = (64, 64), 4, 8, 4
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture
def script(monkeypatch):
    return import_script(monkeypatch, REPO, SCRIPT, "networks.unet", stubs=STUBS)


def loop_body(stage: str, last: str) -> str:
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        last, after=f"def {stage}(")


def same_box_draws(monkeypatch, module, method, corners: Corners) -> None:
    """generate_mask's np.random.randint and our box stream serve the same corner (the rest of
    the script's numpy, its largest-component step's, is numpy)."""

    class NumpyWithBoxDraws(types.SimpleNamespace):
        def __getattr__(self, name):
            return getattr(np, name)

    monkeypatch.setitem(module.generate_mask.__globals__, "np", NumpyWithBoxDraws(
        random=types.SimpleNamespace(randint=lambda low, high: corners.draw("theirs", low, high))))
    stream = types.SimpleNamespace(integers=lambda low, high: corners.draw("ours", low, high))
    monkeypatch.setattr(method.streams, "numpy", lambda purpose: stream)


@pytest.mark.parametrize("stage", ["pre_train", "self_train"])
def test_two_steps_of_each_stage_equal_the_scripts_loop(script, monkeypatch, stage):
    module, unet = script
    args = module.args
    args.batch_size, args.labeled_bs = BATCH, LABELED
    torch.manual_seed(0)
    model = unet.UNet_2d(in_chns=1, class_num=NUM_CLASSES)  # BCP_net (net_factory.py:14-19)
    ema_model = unet.UNet_2d(in_chns=1, class_num=NUM_CLASSES)
    teacher_in_pieces(ema_model, model, ema_model.decoder.out_conv)
    cls = get_method("bcp")
    method = cls(SPECS["acdc"], cls.hparams_for("acdc", {}), {}, args.max_iterations)
    main = stage == "self_train"
    method.start_stage("main" if main else "pretrain", fresh=True)
    rename = unet_renamer(list(method.student.state_dict()))
    method.student.load_state_dict(rename(model.state_dict()))
    method.teacher.load_state_dict(rename(ema_model.state_dict()))
    model.train(), ema_model.train(), method.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # script:223, 338
    ours_optimizer = torch.optim.SGD(method.trainable_parameters(), lr=args.base_lr,
                                     momentum=0.9, weight_decay=0.0001)
    corners = Corners([3, 9, 12, 1])  # two steps x (w, h), within [0, 64 - 42)
    same_box_draws(monkeypatch, module, method, corners)
    last = "update_model_ema(model, ema_model, 0.99)" if main else "optimizer.step()"
    namespace = {**vars(module), "args": args, "model": model, "ema_model": ema_model,
                 "optimizer": optimizer, "labeled_sub_bs": LABELED // 2,
                 "unlabeled_sub_bs": (BATCH - LABELED) // 2}
    gen = torch.Generator().manual_seed(5)
    for step in (0, 1):
        volume_batch = torch.rand(BATCH, 1, *SIZE, generator=gen)
        label_batch = torch.randint(0, NUM_CLASSES, (BATCH, *SIZE), generator=gen)
        namespace.update(iter_num=step,
                         sampled_batch={"image": volume_batch, "label": label_batch})
        torch.manual_seed(7)  # dropout, drawn in the same order on both sides
        exec(loop_body(stage, last), namespace)  # noqa: S102 (the reference's own loop lines)
        if main:
            assert len(torch.unique(namespace["plab_a"])) == NUM_CLASSES
        torch.manual_seed(7)
        loss, _ = method.train_step(Batch(volume_batch[:LABELED], label_batch[:LABELED],
                                          volume_batch[LABELED:]), step)
        torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
        ours_optimizer.zero_grad()
        loss.backward()
        assert_close_by_name({n: p.grad for n, p in method.student.named_parameters()},
                             rename({n: p.grad for n, p in model.named_parameters()}), "grad")
        ours_optimizer.step()
        method.after_optimizer_step(step)
        compared = [(method.student, model, "model")]
        if main:
            compared.append((method.teacher, ema_model, "ema_model"))
        for ours, theirs, what in compared:
            assert_close_by_name(ours.state_dict(), rename(theirs.state_dict()), what)
            # pseudo-labels of near-tie pixels flip on float32 rounding: the next step starts
            # from the reference's weights (our momentum buffers stay ours)
            ours.load_state_dict(rename(theirs.state_dict()))
    assert corners.served == {"theirs": 4, "ours": 4}


def test_the_acdc_constants_are_the_scripts(script):
    module, _ = script
    args = module.args
    hparams = get_method("bcp").hparams_for("acdc", {})
    text = reference_source(REPO, f"{SCRIPT}.py")
    assert hparams["pretrain_iterations"] == args.pre_iterations == 10000
    assert hparams["u_weight"] == args.u_weight
    assert "update_model_ema(model, ema_model, 0.99)" in text and hparams["ema_decay"] == 0.99
    assert hparams["ema_buffers"]  # update_model_ema averages the whole state_dict
    assert "load_net_opt(model, optimizer, pre_trained_model)" in text
    assert hparams["keep_optimizer_state"]
    assert "patch_x, patch_y = int(img_x*2/3), int(img_y*2/3)" in text
    assert hparams["mask_ratio"] == pytest.approx(2 / 3)
    assert hparams["dice_form"] == "batch_squared" and hparams["pseudo_label"] == "argmax"
    assert hparams["largest_component"]  # get_ACDC_masks(pre_a, nms=1)
