"""ABD against its reference code, chy-upc/ABD code/train_ACDC_BCP.py (cited script:N): the
script imported as a module (argparse at its defaults: its own `args`, `mix_loss`,
`get_ACDC_masks`, `generate_mask`, `update_model_ema`, `dice_loss`, and utils/displacement.py's
ABD_R_BCP) and the body of self_train's loop (script:351-437, from reading the batch to the EMA
update) executed on the same weak and strong views as our loss_of_views, the engine's optimiser
over our two TrainedNetworks and our EMA update; its UNet_2d mapped into ours. Two consecutive
steps, at ACDC's 4 classes on 64 x 64 slices with a 4 x 4 grid of 16-pixel patches (the script's
--patch_size 64 of 256), batch 8 (4 labeled); the teacher perturbed so that its pseudo-labels hold
every class in many pieces (get_ACDC_masks(nms=1) matters). Compared: both nets' losses and every
term, every gradient of both nets, both nets' weights and BatchNorm statistics after the step,
and the teacher's after the EMA update.

Bridged, not changed: `.cuda()` is the identity; modules the loop never uses (tensorboardX,
torchvision, matplotlib, the dataset, net-factory and validation modules) are stubs; the box that
generate_mask draws with np.random is handed to ours, and the per-image coin of ABD_R_BCP
(random.random() < 0.5) is the same draw on both sides (random.seed).
"""

from __future__ import annotations

import random

import pytest
import torch

from agcl.data.specs import SPECS
from agcl.engine.optimizers import main_optimizer
from agcl.methods.registry import get_method
from tests.reference_code import (
    assert_close_by_name,
    import_script,
    reference_source,
    script_lines,
    teacher_in_pieces,
)
from tests.test_ref_ss_net import unet_renamer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "chy-upc/ABD", "train_ACDC_BCP"
STUBS = ("tensorboardX", "torchvision", "torchvision.transforms", "matplotlib",
         "matplotlib.pyplot", "dataloaders.dataset", "networks.net_factory", "val_2D")
SIZE, NUM_CLASSES, BATCH, LABELED = (64, 64), 4, 8, 4
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture
def script(monkeypatch):
    return import_script(monkeypatch, REPO, SCRIPT, "networks.unet", stubs=STUBS)


def loop_body() -> str:
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "update_model_ema(model_1, ema_model, 0.99)", after="def self_train(")


def views(gen: torch.Generator) -> dict:
    image = torch.rand(BATCH, 1, *SIZE, generator=gen)
    label = torch.randint(0, NUM_CLASSES, (BATCH, *SIZE), generator=gen)
    strong = (image * 1.3 - 0.1).clamp(0, 1)
    strong[:, :, 8:30, 20:50] = torch.randint(0, 2, (BATCH, 1, 22, 30), generator=gen).float()
    label_strong = label.clone()
    label_strong[:, 8:30, 20:50] = 0  # cutout_gray: the erased region is background
    return {"image": image, "label": label, "image_strong": strong, "label_strong": label_strong}


def test_two_self_training_steps_equal_the_scripts_loop(script, monkeypatch):
    module, unet = script
    args = module.args
    args.batch_size, args.labeled_bs, args.patch_size = BATCH, LABELED, SIZE[0] // args.h_size
    torch.manual_seed(0)
    model_1 = unet.UNet_2d(in_chns=1, class_num=NUM_CLASSES)
    model_2 = unet.UNet_2d(in_chns=1, class_num=NUM_CLASSES)  # other weights: a mix-up shows
    ema_model = unet.UNet_2d(in_chns=1, class_num=NUM_CLASSES)
    teacher_in_pieces(ema_model, model_1, ema_model.decoder.out_conv)
    cls = get_method("abd")
    hparams = cls.hparams_for("acdc", {"displacement_grid": args.h_size})
    method = cls(SPECS["acdc"], hparams, {}, args.max_iterations)
    method.start_stage("main", fresh=True)
    rename = unet_renamer(list(method.student.state_dict()))
    method.student.load_state_dict(rename(model_1.state_dict()))
    method.peer.load_state_dict(rename(model_2.state_dict()))
    method.teacher.load_state_dict(rename(ema_model.state_dict()))
    model_1.train(), model_2.train(), ema_model.train(), method.train()
    optimizer1 = torch.optim.SGD(model_1.parameters(), lr=args.base_lr, momentum=0.9,
                                 weight_decay=0.0001)  # script:328-329
    optimizer2 = torch.optim.SGD(model_2.parameters(), lr=args.base_lr, momentum=0.9,
                                 weight_decay=0.0001)
    ours_optimizer = main_optimizer(method, {"lr": args.base_lr, "momentum": 0.9,
                                             "weight_decay": 0.0001})
    boxes = []

    def recorded_mask(img):  # the script's own generate_mask, its box kept for ours
        mask, loss_mask = module.generate_mask(img)
        boxes.append(mask)
        return mask, loss_mask

    namespace = {**vars(module), "args": args, "model_1": model_1, "model_2": model_2,
                 "ema_model": ema_model, "optimizer1": optimizer1, "optimizer2": optimizer2,
                 "generate_mask": recorded_mask, "labeled_sub_bs": LABELED // 2,
                 "unlabeled_sub_bs": (BATCH - LABELED) // 2}
    gen = torch.Generator().manual_seed(3)
    branches = []
    for step in (0, 1):
        tensors = views(gen)
        namespace.update(iter_num=step, sampled_batch={k: v.clone() for k, v in tensors.items()})
        module.np.random.seed(step)
        random.seed(11 + step)
        torch.manual_seed(7)  # dropout of the three nets, drawn in the same order on both sides
        exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned)

        draws = random.Random(11 + step)
        coins = [draws.random() < hparams["kl_branch_p"] for _ in range(LABELED)]
        branches += coins
        plab = namespace["plab_a"]
        assert len(torch.unique(plab)) == NUM_CLASSES  # pseudo-labels hold every class
        torch.manual_seed(7)
        image, label = tensors["image"], tensors["label"]
        strong, label_strong = tensors["image_strong"], tensors["label_strong"]
        loss, logs = method.loss_of_views(image[:LABELED], label[:LABELED], image[LABELED:],
                                          strong[:LABELED], label_strong[:LABELED],
                                          strong[LABELED:], coins, mask=boxes[-1].float())
        for ours, theirs in (("loss_1", "loss_1"), ("loss_2", "loss_2"),
                             ("loss_cross", "pseudo_supervision1"),
                             ("loss_displaced", "pseudo_supervision3")):
            torch.testing.assert_close(logs[ours], namespace[theirs], **CLOSE,
                                       msg=lambda m, ours=ours: f"{ours}: {m}")
        torch.testing.assert_close(
            logs["loss_bcp_1"], (namespace["loss_dice_1"] + namespace["loss_ce_1"]) / 2, **CLOSE)
        torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
        ours_optimizer.zero_grad()
        loss.backward()
        pairs = ((method.student, model_1, "model_1"), (method.peer, model_2, "model_2"))
        for ours, theirs, what in pairs:
            assert_close_by_name({n: p.grad for n, p in ours.named_parameters()},
                                 rename({n: p.grad for n, p in theirs.named_parameters()}),
                                 f"{what} grad")
        ours_optimizer.step()
        method.after_optimizer_step(step)
        for ours, theirs, what in (*pairs, (method.teacher, ema_model, "ema_model")):
            assert_close_by_name(ours.state_dict(), rename(theirs.state_dict()), what)
            # hard pseudo-labels of near-tie pixels flip on float32 rounding: the next step
            # starts from the reference's weights (our momentum buffers stay ours)
            ours.load_state_dict(rename(theirs.state_dict()))
    assert any(branches) and not all(branches)  # both choices of ABD_R_BCP were taken


def test_the_hyperparameters_are_the_scripts(script):
    module, _ = script
    args = module.args
    hparams = get_method("abd").hparams_for("acdc", {})
    text = reference_source(REPO, f"{SCRIPT}.py")
    assert (hparams["displacement_grid"], hparams["top_num"]) == (args.h_size, args.top_num)
    assert args.h_size == args.w_size and args.patch_size * args.h_size == args.image_size[0]
    assert hparams["u_weight"] == args.u_weight
    assert hparams["pretrain_iterations"] == args.pre_iterations
    assert "update_model_ema(model_1, ema_model, 0.99)" in text and hparams["ema_decay"] == 0.99
    assert hparams["ema_buffers"] and hparams["keep_optimizer_state"]  # load_net_opt (:332-333)
    assert text.count("momentum=0.9, weight_decay=0.0001)") == 3 and args.base_lr == 0.01
    assert "if random.random() < 0.5:" in reference_source(REPO, "utils/displacement.py")
    assert hparams["kl_branch_p"] == 0.5
    data = reference_source(REPO, "dataloaders/dataset.py")
    assert "image_strong, label_strong = cutout_gray(image,label,p=0.5)" in data
    assert "jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)" in data
    assert (hparams["cutout_p"], hparams["jitter"]) == (0.5, 0.8)
    # no lr change in self_train: the unified block's constant lr is the script's
    assert "lr_" not in text.split("def self_train(")[1]


def test_the_peer_starts_from_the_pretrained_student_with_its_momentum():
    """load_net_opt(model_2, optimizer2, pre_trained_model) (script:333): at the main stage the
    peer takes the student's weights, and the engine hands it the student's momentum."""
    from agcl.engine.optimizers import hand_on_optimizer_state

    cls = get_method("abd")
    method = cls(SPECS["acdc"], cls.hparams_for("acdc", {}), {}, 10)
    optimizer = main_optimizer(method, {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4})
    method.start_stage("pretrain", fresh=True)
    x = torch.rand(2, 1, 32, 32)
    method.student(x).sum().backward()
    optimizer.step()
    assert all(p not in optimizer.state for p in method.peer.parameters())
    assert not torch.equal(next(method.peer.parameters()), next(method.student.parameters()))
    assert hand_on_optimizer_state(method, optimizer) == ["peer"]
    method.start_stage("main", fresh=True)
    for ours, origin in zip(method.peer.parameters(), method.student.parameters(), strict=True):
        assert torch.equal(ours, origin)
        assert torch.equal(optimizer.state[ours]["momentum_buffer"],
                           optimizer.state[origin]["momentum_buffer"])
        assert optimizer.state[ours]["momentum_buffer"] is not \
            optimizer.state[origin]["momentum_buffer"]


def test_abd_says_it_cannot_train_a_3d_dataset():
    assert "2D" in get_method("abd").unsupported(SPECS["la"])
    assert get_method("abd").unsupported(SPECS["acdc"]) is None


def test_the_strong_view_erases_a_box_to_background_and_jitters():
    """WeakStrongAugment's strong view (dataset.py:180-181): cutout of random 0 / 1 pixels with
    the label set to 0 there, on about half the images; then ColorJitter on every image."""
    cls = get_method("abd")
    method = cls(SPECS["acdc"], cls.hparams_for("acdc", {}), {}, 10)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 32, 32) * 0.5 + 0.25
    y = torch.randint(1, NUM_CLASSES, (200, 32, 32))
    x_s, y_s = method.strong_views(x, y, g)
    erased = y_s == 0
    assert 0.35 < erased.flatten(1).any(1).float().mean() < 0.65
    assert x_s.min() >= 0 and x_s.max() <= 1 and not torch.equal(x_s[~erased.unsqueeze(1)],
                                                                   x[~erased.unsqueeze(1)])
    assert torch.equal(y_s[~erased], y[~erased])


def test_a_crop_the_grid_does_not_divide_is_refused_by_name():
    cls = get_method("abd")
    hparams = cls.hparams_for("acdc", {})
    assert cls.check_recipe(hparams, {"patch": [256, 256]}, SPECS["acdc"]) == []
    (message,) = cls.check_recipe(hparams, {"patch": [50, 48]}, SPECS["acdc"])
    assert "train.patch [50, 48]" in message and "displacement_grid 4" in message
