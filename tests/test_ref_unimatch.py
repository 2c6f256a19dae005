"""UniMatch against its reference code, LiheYoung/UniMatch more-scenarios/medical/unimatch.py
(cited unimatch.py:N): the script imported as a module with its own model/unet.py and
util/utils.py, and the body of its training loop (unimatch.py:129-181, from the mix batch's
eval-mode prediction to optimizer.step()) read from its text and executed on the same tensors
(labeled, weak, two strong views, two CutMix boxes, the mix batch and its two strong views) as
our loss_of_views and the engine's optimiser. Two consecutive steps (momentum and weight decay
show), at ACDC's 4 classes with the script's full-width U-Net on 64x64 slices, at the script's
conf_thresh and at a low one (so that most unlabeled pixels count, as late in training), the lr
of each step set as the script sets it. Compared: every loss term, the total, every gradient,
the weights and BatchNorm statistics after each step.

Bridged, not changed: `.cuda()` is the identity; torch.distributed.barrier() a no-op (one
process); torchvision and torch.utils.tensorboard are stubs (the loader and writer are not run).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from agcl.data.specs import SPECS
from agcl.engine.optimizers import main_optimizer
from agcl.engine.update import learning_rate
from agcl.methods.augment import cutmix_boxes
from agcl.methods.registry import get_method
from tests.reference_code import (
    assert_close_by_name,
    import_script,
    reference_source,
    reference_text,
    script_lines,
)
from tests.test_ref_ss_net import unet_renamer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, PREFIX, SCRIPT = "LiheYoung/UniMatch", "more-scenarios/medical", "unimatch"
SIZE, NUM_CLASSES, HALF = (64, 64), 4, 2
CLOSE = {"rtol": 1e-5, "atol": 1e-7}
# scipy.ndimage.interpolation: the loader's zoom import, deprecated (removed in SciPy 2)
STUBS = ("torchvision", "torchvision.transforms", "torch.utils.tensorboard",
         "scipy.ndimage.interpolation")


def cfg() -> dict:
    return yaml.safe_load(reference_text(REPO, f"{PREFIX}/configs/acdc.yaml"))


@pytest.fixture
def script(monkeypatch):
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    return import_script(monkeypatch, REPO, SCRIPT, "model.unet", "util.utils", stubs=STUBS,
                         prefix=PREFIX)


def loop_body() -> str:
    return script_lines(REPO, SCRIPT, "with torch.no_grad():", "optimizer.step()",
                        after="for i, ((img_x, mask_x),", prefix=PREFIX)


def views(gen: torch.Generator) -> dict:
    """One step's tensors as the script's loaders give them (boxes of both kinds: none, a box)."""
    def image():
        return torch.rand(HALF, 1, *SIZE, generator=gen)

    boxes = torch.zeros(2, HALF, *SIZE)
    boxes[0, 0, 10:40, 5:30] = 1
    boxes[1, 1, 20:64, 0:50] = 1
    return {"img_x": image(), "mask_x": torch.randint(0, NUM_CLASSES, (HALF, *SIZE), generator=gen),
            "img_u_w": image(), "img_u_s1": image(), "img_u_s2": image(),
            "cutmix_box1": boxes[0], "cutmix_box2": boxes[1], "img_u_w_mix": image(),
            "img_u_s1_mix": image(), "img_u_s2_mix": image()}


@pytest.mark.parametrize("conf_thresh", [None, 0.3])
def test_two_steps_equal_the_scripts_loop(script, conf_thresh):
    module, unet, utils = script
    config = cfg()
    if conf_thresh is not None:
        config["conf_thresh"] = conf_thresh
    total = 1000
    torch.manual_seed(0)
    model = unet.UNet(in_chns=1, class_num=NUM_CLASSES)  # unimatch.py:52
    cls = get_method("unimatch")
    hparams = cls.hparams_for("acdc", {"conf_thresh": config["conf_thresh"]})
    method = cls(SPECS["acdc"], hparams, {}, total)
    rename = unet_renamer(list(method.student.state_dict()))
    method.student.load_state_dict(rename(model.state_dict()))
    model.train(), method.train()
    optimizer = torch.optim.SGD(model.parameters(), config["lr"], momentum=0.9,
                                weight_decay=0.0001)  # unimatch.py:56
    ours_optimizer = main_optimizer(method, {"lr": config["lr"], "momentum": 0.9,
                                             "weight_decay": 0.0001})
    namespace = {**vars(module), "model": model, "optimizer": optimizer, "cfg": config,
                 "criterion_ce": nn.CrossEntropyLoss(),
                 "criterion_dice": utils.DiceLoss(n_classes=NUM_CLASSES)}
    gen = torch.Generator().manual_seed(1)
    masked_pixels = []
    for step in (0, 1):
        # the lr the script set after the previous step (unimatch.py:191-193)
        lr = learning_rate({"lr": config["lr"], "schedule": "poly_lagged"}, step, total)
        if step:
            assert lr == config["lr"] * (1 - (step - 1) / total) ** 0.9
        optimizer.param_groups[0]["lr"] = lr
        for group in ours_optimizer.param_groups:
            group["lr"] = lr
        tensors = views(gen)
        namespace.update({k: v.clone() for k, v in tensors.items()})
        torch.manual_seed(7)  # the U-Net's dropout and Dropout2d, alike on both sides
        exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned)

        strong_mixed = [namespace["img_u_s1"], namespace["img_u_s2"]]  # the script's, mixed
        ours_mixed = [torch.where(tensors[f"cutmix_box{k}"].unsqueeze(1) == 1,
                                  tensors[f"img_u_s{k}_mix"], tensors[f"img_u_s{k}"])
                      for k in (1, 2)]
        torch.testing.assert_close(ours_mixed, strong_mixed, rtol=0, atol=0)
        torch.manual_seed(7)
        loss, logs = method.loss_of_views(
            tensors["img_x"], tensors["mask_x"], tensors["img_u_w"], tensors["img_u_w_mix"],
            ours_mixed, [tensors["cutmix_box1"].long(), tensors["cutmix_box2"].long()])
        for ours, theirs in (("loss_sup", "loss_x"), ("loss_s1", "loss_u_s1"),
                             ("loss_s2", "loss_u_s2"), ("loss_fp", "loss_u_w_fp")):
            torch.testing.assert_close(logs[ours], namespace[theirs], **CLOSE,
                                       msg=lambda m, ours=ours: f"{ours}: {m}")
        torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
        ratio = (namespace["conf_u_w"] >= config["conf_thresh"]).float().mean()
        torch.testing.assert_close(logs["mask_ratio"], ratio)
        masked_pixels.append(float(ratio))
        ours_optimizer.zero_grad()
        loss.backward()
        assert_close_by_name({n: p.grad for n, p in method.student.named_parameters()},
                             rename({n: p.grad for n, p in model.named_parameters()}), "grad")
        ours_optimizer.step()
        assert_close_by_name(method.student.state_dict(), rename(model.state_dict()), "weights")
        # a hard pseudo-label of a near-tie pixel flips on a float32 rounding difference: the
        # next step starts from the reference's weights (our momentum buffers stay ours)
        method.student.load_state_dict(rename(model.state_dict()))
    # what the threshold chose: no pixel confident at 0.95 on an untrained net; at 0.3 most
    # but not all, so that the masked Dice keeps some pixels and drops others
    if conf_thresh is None:
        assert masked_pixels == [0.0, 0.0]
    else:
        assert all(0.5 < r < 1.0 for r in masked_pixels)


def test_the_hyperparameters_are_the_scripts():
    """The constants our UniMatch takes from the reference's text."""
    config = cfg()
    hparams = get_method("unimatch").hparams_for("acdc", {})
    assert hparams["conf_thresh"] == config["conf_thresh"] == 0.95
    script_text = reference_source(REPO, "unimatch.py", PREFIX)
    assert "loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0" \
        in script_text
    assert (hparams["strong_weight"], hparams["fp_weight"]) == (0.25, 0.5)
    assert "SGD(model.parameters(), cfg['lr'], momentum=0.9, weight_decay=0.0001)" in script_text
    assert config["lr"] == 0.01
    # the lr set after step `iters` from `iters`: the reference protocol's poly_lagged
    assert "iters = epoch * len(trainloader_u) + i\n            lr = cfg['lr'] * (1 - iters / " \
        "total_iters) ** 0.9" in script_text
    net_text = reference_source(REPO, "model/unet.py", PREFIX)
    assert "nn.Dropout2d(0.5)(feat)" in net_text and hparams["feature_dropout"] == 0.5
    data_text = reference_source(REPO, "dataset/acdc.py", PREFIX)
    assert data_text.count("if random.random() < 0.8:\n            img_s") == 2
    assert data_text.count("transforms.ColorJitter(0.5, 0.5, 0.5, 0.25)") == 2
    assert (hparams["jitter"], hparams["jitter_p"]) == (0.5, 0.8)
    assert data_text.count("blur(img_s1, p=0.5)") == 1 and hparams["blur_p"] == 0.5
    assert data_text.count("obtain_cutmix_box(self.size, p=0.5)") == 2
    assert hparams["cutmix_p"] == 0.5
    transform_text = reference_source(REPO, "dataset/transform.py", PREFIX)
    assert "sigma = np.random.uniform(0.1, 2.0)" in transform_text
    assert "size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1/0.3" in transform_text
    assert hparams["dice_include_background"]  # DiceLoss(n_classes=4): every class


def test_unimatch_says_it_cannot_train_a_3d_dataset():
    assert "2D" in get_method("unimatch").unsupported(SPECS["la"])
    assert get_method("unimatch").unsupported(SPECS["acdc"]) is None


def test_the_strong_views_follow_the_scripts_draws():
    """Our strong views (agcl.methods.augment) at the hparams: jitter in [0.5, 1.5] on about 80 %
    of samples, clipped to ACDC's [0, 1]; a CutMix box on about half, of area 2-40 %."""
    method = get_method("unimatch")(SPECS["acdc"], get_method("unimatch").hparams_for("acdc"),
                                    {}, 10)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 32, 32)
    view = method.strong_view(x, g)
    assert view.min() >= 0 and view.max() <= 1
    changed = (view - x).abs().flatten(1).amax(1) > 0
    assert 0.75 < changed.float().mean() < 0.95  # 1 - 0.2 x 0.5 = 0.9 expected
    boxes = cutmix_boxes((400, 32, 32), g, x.device, p=method.hparams["cutmix_p"])
    area = boxes.flatten(1).float().mean(1)
    assert 0.4 < (area > 0).float().mean() < 0.6
    assert area[area > 0].min() >= 0.01 and area.max() <= 0.41
