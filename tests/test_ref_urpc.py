"""URPC against SSL4MIS's own code (HiLab-git/SSL4MIS at the pinned commit; see reference_code).

- nets: "urpc2d" vs networks/unet.py UNet_URPC, "urpc3d" vs networks/unet_3D_dv_semi.py, state
  dicts mapped by name; all four outputs in eval mode and in train mode from the same random
  state; parameter counts at real width;
- the loss: the training scripts' own train() run for one iteration on a stand-in net that
  returns fixed logits, its logged terms and the logits' gradients against ours;
- the step: the same scripts' train() for one iteration on a small reference net vs our method on
  the same weights, batch and seed: every logged term, the gradient of every parameter, and the
  weights and BatchNorm statistics after one SGD update.
The scripts run as written; only their surroundings are replaced (data loading, TensorBoard,
validation, .cuda(), the optimiser class wrapped to record gradients).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import types

import pytest
import torch
from torch import nn

from agcl.data.specs import SPECS
from agcl.methods.base import Batch
from agcl.methods.registry import get_method
from agcl.nets import build
from agcl.nets import urpc as our_urpc
from tests.reference_code import reference_modules

REPO = "HiLab-git/SSL4MIS"
SCRIPT_2D = "train_uncertainty_rectified_pyramid_consistency_2D"
SCRIPT_3D = "train_uncertainty_rectified_pyramid_consistency_3D"
SMALL_2D = [4, 8, 16, 32, 64]  # UNet_URPC's feature_chns are [16, ..., 256]; small for speed
SHAPE_2D, SHAPE_3D = (4, 1, 32, 32), (4, 1, 32, 32, 16)  # the steps: 2 labeled, 2 unlabeled

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- reference nets

def ref_modules():
    return reference_modules(REPO, "networks.unet", "networks.unet_3D_dv_semi")


def ref_urpc2d(ref_unet, num_classes: int = 4) -> nn.Module:
    """UNet_URPC with its encoder and Decoder_URPC rebuilt at small widths (unet.py:352-370: the
    same params dict but feature_chns); its own forward runs."""
    net = ref_unet.UNet_URPC(1, num_classes)
    params = {"in_chns": 1, "feature_chns": SMALL_2D, "dropout": [0.05, 0.1, 0.2, 0.3, 0.5],
              "class_num": num_classes, "bilinear": False, "acti_func": "relu"}
    net.encoder = ref_unet.Encoder(params)
    net.decoder = ref_unet.Decoder_URPC(params)
    return net


def ref_urpc3d(ref_dv, num_classes: int = 2) -> nn.Module:
    return ref_dv.unet_3D_dv_semi(feature_scale=16, n_classes=num_classes, in_channels=1)


_RULES_2D = [
    (r"encoder\.in_conv\.conv_conv\.(\d+)\.(.+)", lambda m: f"encoder.blocks.0.{m[1]}.{m[2]}"),
    (r"encoder\.down(\d)\.maxpool_conv\.1\.conv_conv\.(\d+)\.(.+)",
     lambda m: f"encoder.blocks.{m[1]}.{m[2]}.{m[3]}"),
    (r"decoder\.up(\d)\.conv1x1\.(.+)", lambda m: f"decoders.0.ups.{int(m[1]) - 1}.0.{m[2]}"),
    (r"decoder\.up(\d)\.conv\.conv_conv\.(\d+)\.(.+)",
     lambda m: f"decoders.0.blocks.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (r"decoder\.out_conv\.(.+)", lambda m: f"decoders.0.out_conv.{m[1]}"),
    (r"decoder\.out_conv_dp([123])\.(.+)", lambda m: f"decoders.0.aux_convs.{int(m[1]) - 1}.{m[2]}"),
    (r"decoder\.out_conv_dp4\..+", lambda m: None),  # never used upstream; not in ours
]
_RULES_3D = [
    (r"conv(\d)\.conv(\d)\.0\.(.+)", lambda m: f"encoder.blocks.{int(m[1]) - 1}."
                                              f"{3 * (int(m[2]) - 1)}.{m[3]}"),
    (r"center\.conv(\d)\.0\.(.+)", lambda m: f"encoder.blocks.4.{3 * (int(m[1]) - 1)}.{m[2]}"),
    (r"up_concat(\d)\.conv\.conv(\d)\.0\.(.+)",
     lambda m: f"decoders.0.blocks.{4 - int(m[1])}.{3 * (int(m[2]) - 1)}.{m[3]}"),
    (r"dsv1\.(.+)", lambda m: f"decoders.0.out_conv.{m[1]}"),
    (r"dsv([234])\.dsv\.0\.(.+)", lambda m: f"decoders.0.aux_convs.{int(m[1]) - 2}.{m[2]}"),
]


def our_name(ref_name: str, rules) -> str | None:
    for pattern, target in rules:
        if match := re.fullmatch(pattern, ref_name):
            return target(match)
    raise KeyError(f"no mapping for reference key {ref_name}")


def mapped_state(ref_state: dict, rules) -> dict:
    out = {}
    for key, value in ref_state.items():
        name = our_name(key, rules)
        if name is not None:
            out[name] = value.clone()
    return out


def net_pair(dims: int, num_classes: int, seed: int = 0):
    """(reference net, ours with the reference's weights, mapping rules), both float64."""
    ref_unet, ref_dv = ref_modules()
    torch.manual_seed(seed)
    if dims == 2:
        ref, rules = ref_urpc2d(ref_unet, num_classes), _RULES_2D
        ours = build("urpc2d", 1, num_classes, base_features=SMALL_2D[0])
    else:
        ref, rules = ref_urpc3d(ref_dv, num_classes), _RULES_3D
        ours = build("urpc3d", 1, num_classes, n_filters=4)
    ours.load_state_dict(mapped_state(ref.state_dict(), rules))  # strict: every key mapped
    return ref.double(), ours.double(), rules, ref_unet


def patch_feature_dropout_draw(monkeypatch, ref_unet):
    """Upstream draws FeatureDropout's factor with numpy's np.random.uniform (unet.py:281), ours
    from torch's global CPU generator: route the reference's draw to ours, so the same
    torch.manual_seed gives both nets the same factor (and the same later torch draws)."""
    fake_np = types.SimpleNamespace(random=types.SimpleNamespace(uniform=our_urpc.uniform_scalar))
    monkeypatch.setattr(ref_unet, "np", fake_np)


# ----------------------------------------------------------------------------- nets

@pytest.mark.parametrize("dims, num_classes", [(2, 4), (3, 2)])
def test_outputs_equal_the_reference_in_eval_mode(dims, num_classes):
    ref, ours, _, _ = net_pair(dims, num_classes)
    x = torch.randn((2, *(SHAPE_2D if dims == 2 else SHAPE_3D)[1:]), dtype=torch.float64)
    ref.eval(), ours.eval()
    with torch.no_grad():
        expected = ref(x)
        got = ours.forward_all(x)
        main = ours(x)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        assert a.shape == (x.shape[0], num_classes, *x.shape[2:])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # inference uses the main (finest) output, as val_2D.py:54 / val_urpc_util.py:62
    torch.testing.assert_close(main, expected[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dims, num_classes", [(2, 4), (3, 2)])
def test_outputs_equal_the_reference_in_train_mode_from_the_same_random_state(
        dims, num_classes, monkeypatch):
    ref, ours, rules, ref_unet = net_pair(dims, num_classes)
    patch_feature_dropout_draw(monkeypatch, ref_unet)
    x = torch.randn((2, *(SHAPE_2D if dims == 2 else SHAPE_3D)[1:]), dtype=torch.float64)
    ref.train(), ours.train()
    torch.manual_seed(5)
    expected = ref(x)
    torch.manual_seed(5)
    got = ours.forward_all(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # BatchNorm statistics moved alike (2D; the 3D net has InstanceNorm only)
    for key, value in mapped_state(ref.state_dict(), rules).items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-12)
    # the perturbations are on, and forward() gives the main output of the same random state
    torch.manual_seed(5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), got[0].detach(), rtol=0, atol=1e-12)
    ref.eval()
    with torch.no_grad():
        clean = ref(x)
    assert all(not torch.allclose(a, b) for a, b in zip(got[1:], clean[1:]))


def test_perturbations_equal_the_reference_functions(monkeypatch):
    """Decoder_URPC's three perturbations (unet.py:272-301) on a map large enough that a change
    of the feature-dropout range moves its mask, from the same random state."""
    ref_unet, _ = ref_modules()
    patch_feature_dropout_draw(monkeypatch, ref_unet)
    x = torch.randn(2, 8, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)
    expected = (ref_unet.Dropout(x, p=0.5), ref_unet.FeatureDropout(x),
                ref_unet.FeatureNoise()(x))
    torch.manual_seed(1)
    got = (torch.nn.functional.dropout(x, our_urpc.AUX_DROPOUT, training=True),
           our_urpc.feature_dropout(x, *our_urpc.FEATURE_DROP_RANGE),
           our_urpc.feature_noise(x, our_urpc.FEATURE_NOISE))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = (got[1] == 0).all(dim=1).float().mean()
    assert 0 < dropped < 0.5  # the feature-dropout mask is neither empty nor everything


def test_aux_perturbations_off_gives_clean_heads_in_train_mode():
    torch.manual_seed(0)
    net = build("urpc2d", 1, 4, base_features=4, has_dropout=False, aux_perturbations=False)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        first, second = net.train().forward_all(x), net.forward_all(x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_parameter_counts_at_real_width():
    ref_unet, ref_dv = ref_modules()
    count = lambda net: sum(p.numel() for p in net.parameters())
    # UNet_URPC cannot be built on the meta device (FeatureNoise's Uniform checks its bounds
    # with .item()); at 1.8 M parameters a CPU build is cheap.
    ref2d = ref_unet.UNet_URPC(1, 4)
    dead = count(ref2d.decoder.out_conv_dp4)
    with torch.device("meta"):
        ours2d, ours3d = build("urpc2d", 1, 4), build("urpc3d", 1, 2)
        ref3d = ref_dv.unet_3D_dv_semi(n_classes=2, in_channels=1)
    assert (count(ref2d), dead) == (1_831_060, 9_220)
    assert count(ours2d) == count(ref2d) - dead == 1_821_840
    assert count(ours3d) == count(ref3d) == 5_884_504


# ----------------------------------------------------------------------------- the scripts

def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


class _Progress(list):
    def close(self):
        pass


@pytest.fixture
def run_script(monkeypatch, tmp_path):
    """run(script, model, image, label, **args) -> what one iteration of the script's train()
    recorded: its logged scalars, each parameter's gradient at optimizer.step(), the weights
    after the update and the lr the update used."""

    def run(script: str, model: nn.Module, image, label, **args):
        record = {"scalars": {}}

        class Writer:
            def __init__(self, *a, **k):
                pass

            def add_scalar(self, tag, value, step):
                record["scalars"][tag] = float(value.detach() if torch.is_tensor(value) else value)

            def __getattr__(self, name):  # add_image, close, ...
                return lambda *a, **k: None

        class RecordingSGD(torch.optim.SGD):
            def step(self, closure=None):
                params = [p for group in self.param_groups for p in group["params"]]
                record["grads"] = [None if p.grad is None else p.grad.clone() for p in params]
                record["lr"] = self.param_groups[0]["lr"]
                super().step(closure)

        def net_factory(net_type, in_chns, class_num):
            assert (net_type, in_chns) == ("unet_urpc", 1)
            return model

        def make_3d_net(n_classes, in_channels):
            assert in_channels == 1
            return model

        nothing = lambda *a, **k: None
        fakes = {
            "tensorboardX": _module("tensorboardX", SummaryWriter=Writer),
            "torchvision": _module("torchvision", transforms=_module("t", Compose=nothing)),
            "torchvision.utils": _module("torchvision.utils", make_grid=nothing),
            "tqdm": _module("tqdm", tqdm=lambda it, **k: _Progress(it)),
            "dataloaders": _module("dataloaders", utils=_module("u")),
            "dataloaders.dataset": _module(
                "dataloaders.dataset", BaseDataSets=lambda **k: [None] * 300,
                RandomGenerator=nothing, TwoStreamBatchSampler=nothing),
            "dataloaders.brats2019": _module(
                "dataloaders.brats2019", BraTS2019=lambda **k: [None] * 8, CenterCrop=nothing,
                RandomCrop=nothing, RandomRotFlip=nothing, ToTensor=nothing,
                TwoStreamBatchSampler=nothing),
            "val_2D": _module("val_2D", test_single_volume_ds=nothing),
            "val_urpc_util": _module("val_urpc_util", test_all_case=nothing),
            "networks.net_factory": _module("networks.net_factory", net_factory=net_factory),
            "utils.metrics": _module("utils.metrics"),
        }
        for name, module in fakes.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(sys, "argv", [script])
        mod = reference_modules(REPO, script)
        for key, value in {"max_iterations": 1, "batch_size": image.shape[0],
                           "labeled_bs": image.shape[0] // 2, **args}.items():
            setattr(mod.args, key, value)  # the module-level args get_current_... reads
        monkeypatch.setattr(mod, "DataLoader", lambda *a, **k: [{"image": image, "label": label}])
        monkeypatch.setattr(mod, "optim", types.SimpleNamespace(SGD=RecordingSGD))
        if hasattr(mod, "unet_3D_dv_semi"):
            monkeypatch.setattr(mod, "unet_3D_dv_semi", make_3d_net)
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
        assert mod.train(mod.args, str(tmp_path)) == "Training Finished!"
        return record

    return run


class FixedLogits(nn.Module):
    """Returns the same four logits tensors whatever its input: the script's `model(...)`
    and our student's forward_all, so both losses see identical outputs."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.ParameterList(nn.Parameter(t.clone()) for t in logits)

    def forward(self, x):
        return tuple(self.logits)

    def forward_all(self, x):
        return list(self.logits)


def make_method(dims: int, num_classes: int, **hparams):
    cls = get_method("urpc")
    dataset = "acdc" if dims == 2 else "la"
    spec = dataclasses.replace(SPECS[dataset], num_classes=num_classes)
    net_kwargs = {"base_features": SMALL_2D[0]} if dims == 2 else {"n_filters": 4}
    return cls(spec, cls.hparams_for(dataset, hparams), net_kwargs, 1).train()


def data(dims: int, num_classes: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPE_2D if dims == 2 else SHAPE_3D
    image = torch.randn(shape, generator=gen)
    label = torch.randint(0, num_classes, (shape[0], *shape[2:]), generator=gen)
    return image, label


def split(image, label) -> Batch:
    n = image.shape[0] // 2
    return Batch(image[:n], label[:n], image[n:])


# The 2D script's classes come from --num_classes 4 (:47); the 3D script hard-codes 3 (:81).
SCRIPTS = {2: (SCRIPT_2D, 4), 3: (SCRIPT_3D, 3)}
CONFIGS = {  # script args -> our hparams
    "supervised only": ({"consistency": 0.0}, {"consistency": 0.0}),
    "full consistency weight": ({"consistency": 1.0, "consistency_rampup": 0.0},
                                {"consistency": 1.0, "consistency_rampup": 0.0}),
    "script defaults": ({}, {}),
}


def check_logged_terms(scalars: dict, loss, logs: dict, dims: int):
    def close(name, ours):
        ours = ours.detach() if torch.is_tensor(ours) else ours
        torch.testing.assert_close(torch.tensor(float(ours)), torch.tensor(scalars[name]),
                                   rtol=1e-6, atol=1e-7, msg=name)

    close("info/total_loss", loss)
    close("info/consistency_loss", logs["loss_cons"])
    close("info/consistency_weight", logs["cons_weight"])
    if dims == 2:  # the 2D script logs the main scale's CE and Dice (:216-217)
        close("info/loss_ce", logs["loss_ce"])
        close("info/loss_dice", logs["loss_dice"])
    else:
        close("info/supervised_loss", logs["loss_sup"])


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dims", [2, 3])
def test_loss_terms_and_logit_gradients_equal_the_script(dims, config, run_script):
    script, num_classes = SCRIPTS[dims]
    script_args, hparams = CONFIGS[config]
    image, label = data(dims, num_classes)
    gen = torch.Generator().manual_seed(11)
    logits = [3 * torch.randn((image.shape[0], num_classes, *image.shape[2:]), generator=gen)
              for _ in range(4)]
    record = run_script(script, FixedLogits(logits), image, label, **script_args)

    method = make_method(dims, num_classes, **hparams)
    method.student = FixedLogits(logits)
    loss, logs = method.train_step(split(image, label), 0)
    loss.backward()
    check_logged_terms(record["scalars"], loss, logs, dims)
    for ours, theirs in zip(method.student.logits, record["grads"]):
        torch.testing.assert_close(ours.grad, theirs, rtol=1e-5, atol=1e-9)
    if config != "supervised only":  # the consistency gradient is really in the comparison
        assert logs["cons_weight"] > 0 and logs["loss_cons"] > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_one_training_step_equals_the_script(dims, run_script, monkeypatch):
    script, num_classes = SCRIPTS[dims]
    ref_unet, ref_dv = ref_modules()
    torch.manual_seed(0)
    if dims == 2:
        ref, rules = ref_urpc2d(ref_unet, num_classes), _RULES_2D
        patch_feature_dropout_draw(monkeypatch, ref_unet)
    else:
        ref, rules = ref_urpc3d(ref_dv, num_classes), _RULES_3D
    initial = copy.deepcopy(ref.state_dict())
    names = [name for name, _ in ref.named_parameters()]
    image, label = data(dims, num_classes)
    args = {"consistency": 1.0, "consistency_rampup": 0.0}

    torch.manual_seed(21)
    record = run_script(script, ref, image, label, **args)

    method = make_method(dims, num_classes, **args)
    method.student.load_state_dict(mapped_state(initial, rules))
    lr = 0.01 if dims == 2 else 0.1  # --base_lr (2D :42, 3D :44); the step-0 lr of both scripts
    assert record["lr"] == lr
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=lr, momentum=0.9,
                                weight_decay=1e-4)  # 2D :114-115, 3D :112-113
    torch.manual_seed(21)
    loss, logs = method.train_step(split(image, label), 0)
    optimizer.zero_grad()
    loss.backward()
    check_logged_terms(record["scalars"], loss, logs, dims)

    ours = dict(method.student.named_parameters())
    compared = 0
    for name, theirs in zip(names, record["grads"]):
        target = our_name(name, rules)
        if target is None:  # out_conv_dp4: never used, no gradient upstream either
            assert theirs is None
            continue
        torch.testing.assert_close(ours[target].grad, theirs, rtol=1e-4, atol=1e-7, msg=name)
        compared += 1
    assert compared == len(ours)
    optimizer.step()
    after = method.student.state_dict()
    for key, value in mapped_state(ref.state_dict(), rules).items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_consistency_weight_follows_the_scripts_ramp():
    ramps = reference_modules(REPO, "utils.ramps")
    for dims, rampup in ((2, 200.0), (3, 400.0)):
        method = make_method(dims, 2)
        method.student = FixedLogits([torch.randn(2, 2, *([16] * dims)) for _ in range(4)])
        assert method.hparams["consistency_rampup"] == rampup
        image = torch.randn(2, 1, *([16] * dims))
        batch = Batch(image[:1], torch.zeros(1, *([16] * dims), dtype=torch.long), image[1:])
        for step in (0, 149, 150, 151, 14_999, 29_999, 59_999, 80_000):
            logs = method.train_step(batch, step)[1]
            # get_current_consistency_weight(iter_num // 150), iter_num = the 0-based step
            expected = 0.1 * ramps.sigmoid_rampup(step // 150, rampup)
            assert logs["cons_weight"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("script", [SCRIPT_2D, SCRIPT_3D, "train_mean_teacher_2D",
                                    "train_fully_supervised_2D"])
def test_poly_lagged_is_the_lr_the_ssl4mis_loop_sets(script):
    """SSL4MIS sets the next step's lr after each step from the step just taken (its lines read
    from the script: the lr_ assignment, then iter_num += 1): schedule poly_lagged gives the lr
    every step of that loop runs at; plain poly runs one step ahead."""
    from agcl.engine.update import learning_rate
    from tests.reference_code import reference_source

    text = reference_source(REPO, f"{script}.py")
    formula = re.search(r"lr_ = (base_lr \* \(1\.0 - iter_num / max_iterations\) \*\* 0\.9)",
                        text).group(1)
    assert text.index("lr_ = base_lr") < text.index("iter_num = iter_num + 1")
    base_lr, max_iterations = 0.01, 50
    used, lr = [], base_lr  # the optimiser starts at base_lr
    for iter_num in range(max_iterations):
        used.append(lr)  # optimizer.step() runs at the current lr
        lr = eval(formula, {"base_lr": base_lr, "iter_num": iter_num,
                            "max_iterations": max_iterations})
    lagged = [learning_rate({"lr": base_lr, "schedule": "poly_lagged"}, t, max_iterations)
              for t in range(max_iterations)]
    assert lagged == pytest.approx(used, rel=1e-15, abs=0)
    ahead = [learning_rate({"lr": base_lr, "schedule": "poly"}, t, max_iterations)
             for t in range(max_iterations)]
    assert ahead[1:-1] == pytest.approx(used[2:], rel=1e-15)  # poly at t is theirs at t + 1
    assert ahead != pytest.approx(used)
