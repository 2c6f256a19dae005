"""AD-MT against its reference code, ZhenZHAO/AD-MT code/train_post_3d_aut.py (LA, cited 3d:N)
and code/train_post_2d_aut.py (ACDC, 2d:N): each script imported as a module (its own helpers,
train_utils.AlternateUpdate / get_compromise_pseudo_btw_tea_stu, dataloaders.mixaugs,
utils.losses), its `args` built by its own argparse lines (3d:503-580) at their defaults and
updated from its cfg (cfgs/config_3d_la_aut.yml, cfgs/config_2d_aut.yml) with its own
update_values, and the body of its training loop (3d:181-357, 2d:193-368: from the batch to the
EMA update and alternate_indicator.update()) read from its text and executed on the same tensors
as our loss_of_views, the engine's optimiser and our after_optimizer_step. Three consecutive
steps: two in the first teacher's turn (the loader's strong view) with a switch at the end of
the second, then one in the second teacher's turn (CutMix of the weak view); at iterations where
the EMA warm-up ends (alpha 0, 0, then 0.5) and where the consistency ramp reaches its end, with
alt_param_conflict_weight 1 (the cfgs') and 0.5 (consistent / conflicting pixels apart).
Compared: every loss term, the total, the ramp weight, every student gradient, the student's
weights and BatchNorm statistics after the step, both teachers after the EMA update, and the
alternation's flag and counter. LA: the script's V-Net at width 4 on 32^3 patches; ACDC: its
full-width U-Net on 64x64 slices, 4 classes.

Bridged, not changed: `.cuda()` is the identity; torchvision, torch.utils.tensorboard, cv2 and
nibabel are stubs (loaders, writer and validation are not run); the reference's CutMix is
wrapped to record its draws (its torch.randperm, seeded so that it swaps the two unlabeled
images, and its numpy box draws, replayed from the RNG states around the call) and hand them to
our loss_of_views, and to leave torch's global RNG as before the call (so that both sides'
dropout masks are drawn alike); the period drawn at a switch
is handed to ours. Teachers' (and the student's) output convolutions are scaled so that the
confidence mask is neither empty nor full and the teacher / student compromise has pixels to act
on. Hard pseudo-labels of near-tie pixels flip on float32 rounding, so each step starts from the
reference's weights (our momentum buffers stay ours).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import yaml
from torch.nn.modules.loss import CrossEntropyLoss

from agcl.data.specs import SPECS
from agcl.engine.optimizers import main_optimizer
from agcl.engine.update import learning_rate
from agcl.methods.registry import get_method, method_module
from agcl.nets import build
from tests.reference_code import (
    assert_close_by_name,
    import_script,
    reference_source,
    reference_text,
    script_lines,
)
from tests.test_ref_ss_net import unet_renamer
from tests.test_ref_ua_mt import ours_named as vnet_ours_named

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "ZhenZHAO/AD-MT"
STUBS = ("tensorboardX", "torchvision", "torchvision.transforms", "torch.utils.tensorboard",
         "cv2", "nibabel", "scipy.ndimage.interpolation")
CLOSE = {"rtol": 1e-5, "atol": 1e-7}
CASES = {  # dataset: script, cfg, patch, classes, our net kwargs, cutmix function
    "la": ("train_post_3d_aut", "cfgs/config_3d_la_aut.yml", (32, 32, 32), 2,
           {"n_filters": 4}, "cut_mix_3d"),
    "acdc": ("train_post_2d_aut", "cfgs/config_2d_aut.yml", (64, 64), 4, {}, "cut_mix"),
}
BATCH, LABELED = 4, 2
# the gradient of a bias before BatchNorm is 0 but for rounding, which grows with the loss
GRAD_FLOOR = 2e-5
PERM_SEED = 1  # torch.randperm(2) == [1, 0] after torch.manual_seed(1)


def script_args(module, dataset: str) -> dict:
    """The script's own argparse lines at their defaults, updated from its cfg as it does."""
    script, cfg = CASES[dataset][:2]
    namespace = {"argparse": argparse}
    exec(script_lines(REPO, script, "parser = argparse.ArgumentParser()",  # noqa: S102
                      "args = vars(args)"), namespace)
    args = namespace["args"]
    module.update_values(yaml.safe_load(reference_text(REPO, cfg)), args)
    return args


@pytest.fixture
def loaded(monkeypatch, request):
    dataset = request.param
    script = CASES[dataset][0]
    module, nets, mixaugs, train_utils = import_script(
        monkeypatch, REPO, script, "networks.vnet" if dataset == "la" else "networks.unet",
        "dataloaders.mixaugs", "train_utils", stubs=STUBS)
    return dataset, module, nets, mixaugs, train_utils


def renamer(dataset: str, our_names):
    if dataset == "la":
        return vnet_ours_named
    return unet_renamer(our_names)


def reference_net(dataset: str, nets, classes: int):
    if dataset == "la":  # net_factory's vnet (net_factory.py:13-15), at width 4
        return nets.VNet(n_channels=1, n_classes=classes, n_filters=4,
                         normalization="batchnorm", has_dropout=True)
    return nets.UNet(in_chns=1, class_num=classes)  # net_factory's unet


def recording_cutmix(mixaugs, name: str, record: list):
    """The reference's cut_mix(_3d), recording its draws (permutation and boxes) by replaying
    the RNG states around the call; its torch.randperm draws from a seed that swaps the two
    unlabeled images (an identity permutation would mix nothing), and torch's global RNG is left
    as before the call."""
    real = getattr(mixaugs, name)
    bbox = mixaugs.rand_bbox_3d if name.endswith("3d") else mixaugs.rand_bbox

    def wrapper(img, *rest):
        torch_state, np_state = torch.get_rng_state(), np.random.get_state()
        torch.manual_seed(PERM_SEED)  # a permutation that moves every image
        out = real(img, *rest)
        np_after = np.random.get_state()
        torch.manual_seed(PERM_SEED)
        np.random.set_state(np_state)
        perm = torch.randperm(img.size()[0])[:img.size()[0]]
        assert perm.tolist() == [1, 0]
        boxes = bbox(img.size(), lam=np.random.beta(4, 4))
        assert np.random.get_state()[1].tolist() == np_after[1].tolist()
        torch.set_rng_state(torch_state)
        record.append((perm, boxes))
        return out

    return wrapper


def box_mask(shape, boxes) -> torch.Tensor:
    """The reference's boxes (x1, y1[, z1], x2, y2[, z2]) as our (B, *spatial) mask."""
    dims = len(shape) - 1
    mask = torch.zeros(shape, dtype=torch.bool)
    for i in range(shape[0]):
        region = tuple(slice(int(boxes[k][i]), int(boxes[k + dims][i])) for k in range(dims))
        mask[(i, *region)] = True
    return mask


def make_views(dataset: str, gen: torch.Generator):
    patch, classes = CASES[dataset][2], CASES[dataset][3]
    weak = torch.rand(BATCH, 1, *patch, generator=gen)
    strong = (weak + 0.2 * torch.randn(weak.shape, generator=gen)).clamp(0, 1)
    if dataset == "la":
        label = (weak[:, 0] > 0.55).long()
    else:
        label = torch.randint(0, classes, (BATCH, *patch), generator=gen)
    return weak, strong, label


@pytest.mark.parametrize("loaded,start,conflict_weight",
                         [("la", 80, 1.0), ("la", 5999, 0.5),
                          ("acdc", 100, 1.0), ("acdc", 7499, 0.5)],
                         indirect=["loaded"])
def test_three_steps_equal_the_scripts_loop(loaded, start, conflict_weight):
    dataset, module, nets, mixaugs, train_utils = loaded
    script, _, patch, classes, net_kwargs, cutmix_name = CASES[dataset]
    args = script_args(module, dataset)
    args.update(alt_param_conflict_weight=conflict_weight, num_classes=classes,
                batch_size=BATCH, labeled_bs=LABELED)
    torch.manual_seed(0)
    model, ema_model, ema_model_another = (reference_net(dataset, nets, classes)
                                           for _ in range(3))  # create_model() x3 (3d:85-87)
    with torch.no_grad():  # confident on part of the pixels, and the teachers disagreeing
        model_scale, teacher_scale = (4.0, 12.0) if dataset == "la" else (10.0, 200.0)
        def out_conv(net):
            return net.out_conv if dataset == "la" else net.decoder.out_conv

        out_conv(model).weight.mul_(model_scale)
        out_conv(ema_model).weight.mul_(teacher_scale)
        out_conv(ema_model_another).weight.mul_(-teacher_scale)
    for net in (ema_model, ema_model_another):
        for param in net.parameters():
            param.detach_()
    cls = get_method("ad_mt")
    hparams = cls.hparams_for(dataset, {"conflict_weight": conflict_weight})
    method = cls(SPECS[dataset], hparams, net_kwargs, args["max_iterations"])
    rename = renamer(dataset, list(method.student.state_dict()))
    pairs = ((method.student, model, "student"), (method.teacher, ema_model, "teacher"),
             (method.teacher_another, ema_model_another, "teacher_another"))
    for ours, theirs, _ in pairs:
        ours.load_state_dict(rename(theirs.state_dict()))
    model.train(), ema_model.train(), ema_model_another.train(), method.train()

    np.random.seed(2023)
    alternate_indicator = train_utils.AlternateUpdate(args["alt_param_updating_period_iters"],
                                                      initial_flag=True, flag_random=True)
    alternate_indicator.random_alternate_period = 2  # a switch after the second step
    method.first_teacher_turn, method.turn_counter, method.turn_period = True, 0, 2

    optimizer = torch.optim.SGD(model.parameters(), lr=args["base_lr"], momentum=0.9,
                                weight_decay=0.0001)  # 3d:128-129
    ours_optimizer = main_optimizer(method, {"lr": args["base_lr"], "momentum": 0.9,
                                             "weight_decay": 0.0001})
    record: list = []
    namespace = {**vars(module), "args": args, "batch_size": BATCH, "model": model,
                 "ema_model": ema_model, "ema_model_another": ema_model_another,
                 "optimizer": optimizer, "ce_loss": CrossEntropyLoss(),
                 "dice_loss": module.losses.DiceLoss(classes),
                 "alternate_indicator": alternate_indicator, "flag_start_self_learning": False,
                 "var_param_conflict_weight": args["alt_param_conflict_weight"],
                 cutmix_name: recording_cutmix(mixaugs, cutmix_name, record),
                 **{key: args[key] for key in ("alt_flag_conflict_mode",
                                               "alt_flag_conflict_stu_use_more",
                                               "alt_param_ensemble_temp")}}
    body = script_lines(REPO, script, 'num_lb = args["labeled_bs"]',
                        "alternate_indicator.update()")
    gen = torch.Generator().manual_seed(start)
    turns, acted, ratios = [], [], []
    for step in (start, start + 1, start + 2):
        lr = learning_rate({"lr": args["base_lr"], "schedule": "poly_lagged"}, step,
                           args["max_iterations"])  # set after the previous step (3d:361-367)
        for group in optimizer.param_groups + ours_optimizer.param_groups:
            group["lr"] = lr
        weak, strong, label = make_views(dataset, gen)
        first = alternate_indicator.get_alternate_state()
        assert method.first_teacher_turn == first
        turns.append(first)
        namespace.update(iter_num=step, sampled_batch={
            "image_weak": weak.clone(), "image_strong": strong.clone(), "label_aug": label})
        record.clear()
        torch.manual_seed(7)  # dropout of the teacher in train mode and of the student
        exec(body, namespace)  # noqa: S102 (the reference's own loop lines, pinned snapshot)

        plan = None
        if not first:
            assert len(record) == 1  # cutmix_prob 1.0: always mixed
            perm, boxes = record[0]
            plan = (perm, box_mask((BATCH - LABELED, *patch), boxes))
        torch.manual_seed(7)
        loss, logs = method.loss_of_views(weak[BATCH - LABELED:], label[BATCH - LABELED:],
                                          weak[:BATCH - LABELED],
                                          strong[:BATCH - LABELED] if first else None, plan,
                                          step)
        torch.testing.assert_close(logs["loss_sup"], namespace["loss_lb"], **CLOSE)
        torch.testing.assert_close(logs["loss_ulb"], namespace["loss_ulb"], **CLOSE)
        torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
        assert logs["cons_weight"] == pytest.approx(namespace["consistency_weight"], rel=1e-15)
        torch.testing.assert_close(logs["high_ratio"], namespace["high_ratio"])
        torch.testing.assert_close(logs["conflict_ratio"], namespace["conflict_ratio"])
        if conflict_weight != 1.0:
            torch.testing.assert_close(logs["loss_ulb_consist"], namespace["loss_ulb_consist"],
                                       **CLOSE)
            torch.testing.assert_close(logs["loss_ulb_conflict"],
                                       namespace["loss_ulb_conflict"], **CLOSE)
        ratios.append(float(namespace["high_ratio"]))
        acted.append(int(namespace["conflict_tea_stu"].sum()))

        ours_optimizer.zero_grad()
        loss.backward()
        assert_close_by_name({n: p.grad for n, p in method.student.named_parameters()},
                             rename({n: p.grad for n, p in model.named_parameters()}), "grad",
                             floor=GRAD_FLOOR)
        ours_optimizer.step()
        method.after_optimizer_step(step)
        assert (method.first_teacher_turn, method.turn_counter) == (
            alternate_indicator.get_alternate_state(), alternate_indicator._counter)
        if method.turn_counter == 0:  # a switch: the period the script drew (utils:59-60)
            assert 1 <= method.turn_period <= args["alt_param_updating_period_iters"]
            method.turn_period = alternate_indicator.random_alternate_period
        for ours, theirs, what in pairs:
            # num_batches_tracked: the script's EMA blends it as a float (3d:52-53)
            expected = {k: v for k, v in rename(theirs.state_dict()).items()
                        if not k.endswith("num_batches_tracked")}
            mine = {k: v for k, v in ours.state_dict().items() if k in expected}
            assert_close_by_name(mine, expected, what)
            with torch.no_grad():
                for name, value in rename(theirs.state_dict()).items():
                    target = ours.state_dict()[name]
                    target.copy_(value.to(target.dtype))
    assert turns == [True, True, False]
    assert sum(acted) > 0  # the student won some conflicting pixels
    assert max(ratios) < 1.0 and ratios[0] > 0.0  # some pixels confident, not all


@pytest.mark.parametrize("loaded", ["la", "acdc"], indirect=True)
def test_the_hyperparameters_are_the_scripts(loaded):
    """Every constant our AD-MT takes from the script and its cfg."""
    dataset, module, *_ = loaded
    script = CASES[dataset][0]
    args = script_args(module, dataset)
    text = reference_source(REPO, f"{script}.py")
    h = get_method("ad_mt").hparams_for(dataset)
    assert h["ema_decay"] == args["ema_decay"] == 0.99
    assert (h["consistency"], h["consistency_rampup"]) == (args["consistency"],
                                                          args["consistency_rampup"])
    assert h["conf_threshold"] == args["conf_threshold"]
    assert h["ulb_loss_type"] == args["flag_ulb_loss_type"]
    assert h["conflict_mode"] == args["alt_flag_conflict_mode"]
    assert h["conflict_student_use_more"] == args["alt_flag_conflict_stu_use_more"]
    assert h["conflict_weight"] == args["alt_param_conflict_weight"]
    assert h["ensemble_temp"] == args["alt_param_ensemble_temp"]
    assert h["updating_period"] == args["alt_param_updating_period_iters"]
    assert h["updating_period_random"] == args["alt_flag_updating_period_random"]
    assert h["cutmix_prob"] == args["cutmix_prob"]
    assert "consistency_weight = get_current_consistency_weight(iter_num//150, args)" in text
    assert h["rampup_epoch_iterations"] == 150
    assert text.count('args["ema_decay"], iter_num//2, args)') == 2
    assert h["ema_step_divisor"] == 2
    assert "if global_step < args[\"consistency_rampup\"]:\n        alpha = 0.0" in text
    assert "momentum=0.9, weight_decay=0.0001)" in text and args["base_lr"] == 0.01
    assert args["poly"] and "lr_ = base_lr * (1.0 - iter_num / max_iterations) ** 0.9" in text
    assert h["dice_include_background"] and h["dice_form"] == "squared"
    if dataset == "la":
        data = reference_source(REPO, "dataloaders/dataset_3d.py")
        assert "def __init__(self, output_size, p_color=0.8, p_blur=0.2, flag_rot=True)" in data
        assert "RandomBrightnessContrast(brightness_limit=0.5, \n" in data
        assert "RandomGaussianNoise(sigma=[0.1, 1.0], \n" in data
    else:
        data = reference_source(REPO, "dataloaders/dataset_2d.py")
        assert "func_strong_augs(image, p_color=0.8, p_blur=0.2)" in data
        assert "transforms.ColorJitter(0.5, 0.5, 0.5, 0.25)" in data
        assert "sigma = np.random.uniform(0.1, 2.0)" in data
    assert (h["color_p"], h["color_limit"], h["noise_p"]) == (0.8, 0.5, 0.2)
    utils_text = reference_source(REPO, "train_utils.py")
    assert ("self._counter = 0\n            if self.flag_random:\n                self."
            "random_alternate_period = np.random.randint(1, self.alternate_period +1)"
            ) in utils_text


@pytest.mark.parametrize("loaded", ["la"], indirect=True)
def test_the_ema_and_the_ramp_are_the_scripts(loaded):
    """update_ema_variables (3d:40-53) over parameters and float buffers, and the ramp, at the
    steps around the warm-up's end and late; get_current_consistency_weight (3d:35-37)."""
    _, module, *_ = loaded
    args = script_args(module, "la")
    method = get_method("ad_mt")(SPECS["la"], get_method("ad_mt").hparams_for("la"),
                                 {"n_filters": 2}, 15000)
    ema_module = method_module("ad_mt")
    for step in (0, 79, 80, 82, 84, 300, 14000):
        torch.manual_seed(step)
        student = build("vnet", 1, 2, n_filters=2)
        theirs, ours = build("vnet", 1, 2, n_filters=2), build("vnet", 1, 2, n_filters=2)
        ours.load_state_dict(theirs.state_dict())
        for net in (student, theirs):
            for buffer in net.buffers():
                if buffer.is_floating_point():
                    buffer.uniform_()
        ours.load_state_dict(theirs.state_dict())
        module.update_ema_variables(student, theirs, args["ema_decay"], step // 2, args)
        method.student, method.teacher = student, ours
        method.first_teacher_turn, method.turn_counter, method.turn_period = True, 0, 5
        method.after_optimizer_step(step)
        state = {k: v for k, v in theirs.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
        assert_close_by_name({k: ours.state_dict()[k] for k in state}, state, f"ema {step}",
                             relative=1e-6)
        h = method.hparams
        assert ema_module.epoch_rampup(step, 150, h["consistency_rampup"]) * h["consistency"] \
            == pytest.approx(module.get_current_consistency_weight(step // 150, args), rel=1e-15)


def test_the_alternation_follows_alternate_update(monkeypatch):
    """Our flag / counter / period against train_utils.AlternateUpdate (utils:12-60) over many
    steps, the periods handed over; and our own draws span [1, period]."""
    train_utils = import_script(monkeypatch, REPO, "train_utils", stubs=STUBS)
    cls = get_method("ad_mt")
    method = cls(SPECS["acdc"], cls.hparams_for("acdc"), {"base_features": 2}, 1000)
    method.teacher = method.teacher_another = method.student  # the EMA is not the point here
    np.random.seed(0)
    theirs = train_utils.AlternateUpdate(50, initial_flag=True, flag_random=True)
    method.turn_period = theirs.random_alternate_period
    flags = []
    for step in range(400):
        assert method.first_teacher_turn == theirs.get_alternate_state()
        flags.append(method.first_teacher_turn)
        theirs.update()
        monkeypatch.setattr(method, "draw_period", lambda: theirs.random_alternate_period)
        method.after_optimizer_step(step)
        assert (method.first_teacher_turn, method.turn_counter, method.turn_period) == (
            theirs.get_alternate_state(), theirs._counter, theirs.random_alternate_period)
    assert 0 < sum(flags) < len(flags)
    monkeypatch.undo()
    fresh = cls(SPECS["acdc"], cls.hparams_for("acdc"), {"base_features": 2}, 10)
    drawn = {fresh.draw_period() for _ in range(2000)}
    assert drawn == set(range(1, 51))


def test_the_alternation_is_checkpointed():
    cls = get_method("ad_mt")
    source = cls(SPECS["acdc"], cls.hparams_for("acdc"), {"base_features": 2}, 1000)
    source.first_teacher_turn, source.turn_counter, source.turn_period = False, 3, 17
    target = cls(SPECS["acdc"], cls.hparams_for("acdc"), {"base_features": 2}, 1000)
    target.load_state_dict(source.state_dict())
    assert (target.first_teacher_turn, target.turn_counter, target.turn_period) == (False, 3, 17)


def test_the_strong_views_follow_the_loaders():
    """LA: brightness / contrast on about 80 % of samples, in the crop's range before noise,
    noise on about 20 %; ACDC: jitter and blur clipped to [0, 1]."""
    cls = get_method("ad_mt")
    g = torch.Generator().manual_seed(0)
    la = cls(SPECS["la"], cls.hparams_for("la"), {"n_filters": 2}, 10)
    x = torch.randn(400, 1, 4, 4, 4)
    view = la.strong_view(x, g)
    changed = (view - x).abs().flatten(1).amax(1) > 1e-6
    assert 0.78 < changed.float().mean() < 0.9  # 1 - 0.2 x 0.8 = 0.84 expected
    acdc = cls(SPECS["acdc"], cls.hparams_for("acdc"), {"base_features": 2}, 10)
    x = torch.rand(400, 1, 16, 16)
    view = acdc.strong_view(x, g)
    assert view.min() >= 0 and view.max() <= 1
    changed = (view - x).abs().flatten(1).amax(1) > 0
    assert 0.78 < changed.float().mean() < 0.9


def test_the_cutmix_boxes_follow_rand_bbox(monkeypatch):
    """Our boxes on the reference's own draws (numpy's legacy RandomState behind both)."""
    mixaugs = import_script(monkeypatch, REPO, "dataloaders.mixaugs", stubs=STUBS)
    ad_mt = method_module("ad_mt")
    for shape in ((3, 32, 48), (3, 32, 32, 16)):
        np.random.seed(5)
        lam = np.random.beta(4, 4)
        boxes = (mixaugs.rand_bbox_3d if len(shape) == 4 else mixaugs.rand_bbox)(
            (shape[0], 1, *shape[1:]), lam=lam)

        class Replay:  # our Generator calls answered by the same legacy draws
            def __init__(self):
                np.random.seed(5)

            def beta(self, a, b):
                return np.random.beta(a, b)

            def integers(self, low, high, size):
                return np.random.randint(size=[size], low=low, high=high)

        ours = ad_mt.cutmix_boxes_3d_style(shape, Replay(), torch.device("cpu"))
        assert torch.equal(ours, box_mask(shape, boxes))
        assert 0 < ours.float().mean() < 1
