"""UA-MT (and the Mean Teacher it extends) against its reference code, yulequan/UA-MT
code/train_LA_meanteacher_certainty_unlabel.py (cited script:N), whose loop lines run as the
script runs them: the script is imported as a module (argparse at its defaults, so its own
`args`, `get_current_consistency_weight` and `update_ema_variables`), and its training-loop body
(script:141-181, from reading the batch to the EMA update) is read from its text and executed
in float32 on the same tensors as our method's train_step and the engine's SGD and EMA update.

Bridged, not changed: `.cuda()` is the identity (CPU), and the script's torch.randn_like draws
(teacher input noise, then the T/2 uncertainty passes) and our streams' draws return the same
pre-drawn normals, in the same order, so that torch's global RNG (dropout) is consumed the same
way in both. Compared: the loss, the supervised and consistency terms, every gradient of the
student, then the student's weights and BatchNorm statistics after SGD and the teacher's after
the EMA update, at steps 0 and 3000 (consistency ramp and uncertainty threshold mid-way). The
net runs at the script's 112x112x80 patch (its prediction buffer has that shape) and width 2.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch

from agcl.data.specs import SPECS
from agcl.methods import Batch
from agcl.methods.ema import ema_update
from agcl.methods.registry import get_method, method_module
from agcl.nets.vnet_sdf import _REFERENCE_MODULES
from tests.reference_code import (
    SameNormals,
    assert_same_update,
    import_script,
    reference_source,
    script_lines,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "yulequan/UA-MT", "train_LA_meanteacher_certainty_unlabel"
PATCH, N_FILTERS = (112, 112, 80), 2
# float32 as the script trains (its uncertainty buffer is float32); sums in another order
CLOSE = {"rtol": 1e-5, "atol": 1e-7}
STUBS = ("tensorboardX", "torchvision", "torchvision.transforms", "torchvision.utils")
# the reference VNet's blocks -> ours (vnet_sdf's map without its distance head)
MODULES = {**{k: v for k, v in _REFERENCE_MODULES.items() if not k.startswith("out_conv")},
           "out_conv": "decoders.0.out_conv"}


def ours_named(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        block, rest = key.split(".", 1)
        out[f"{MODULES[block]}.{rest.removeprefix('conv.')}"] = value
    return out


@pytest.fixture
def script(monkeypatch):
    return import_script(monkeypatch, REPO, SCRIPT, "networks.vnet", stubs=STUBS)


def loop_body() -> str:
    """The script's loop body from reading the batch to the EMA update (script:141-181)."""
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "update_ema_variables(model, ema_model, args.ema_decay, iter_num)")


@pytest.mark.parametrize("method_name,iter_num", [("ua_mt", 0), ("ua_mt", 3000)])
def test_one_step_equals_the_scripts_loop(script, monkeypatch, method_name, iter_num):
    module, vnet = script
    args = module.args
    torch.manual_seed(0)
    model = vnet.VNet(n_channels=1, n_classes=2, n_filters=N_FILTERS, normalization="batchnorm",
                      has_dropout=True)
    ema_model = vnet.VNet(n_channels=1, n_classes=2, n_filters=N_FILTERS,
                          normalization="batchnorm", has_dropout=True)
    for param in ema_model.parameters():
        param.detach_()
    with torch.no_grad():  # a teacher certain on part of the volume: a mask neither 0 nor 1
        ema_model.out_conv.weight.mul_(40)
    cls = get_method(method_name)
    hparams = cls.hparams_for("la", {"passes_per_forward": 2})  # the script's 2 per forward
    method = cls(SPECS["la"], hparams, {"n_filters": N_FILTERS}, args.max_iterations)
    method.student.load_state_dict(ours_named(model.state_dict()))
    method.teacher.load_state_dict(ours_named(ema_model.state_dict()))
    model.train(), ema_model.train(), method.train()

    noise = SameNormals(seed=iter_num)
    gen = torch.Generator().manual_seed(1 + iter_num)
    volume_batch = torch.randn(args.batch_size, 1, *PATCH, generator=gen)
    label_batch = (volume_batch[:, 0] > 0.3).long()
    labeled_bs = args.labeled_bs

    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # script:120
    namespace = {**vars(module), "model": model, "ema_model": ema_model,
                 "optimizer": optimizer, "iter_num": iter_num, "labeled_bs": labeled_bs,
                 "sampled_batch": {"image": volume_batch, "label": label_batch},
                 "consistency_criterion": module.losses.softmax_mse_loss}
    randn_like = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", noise.randn_like)
    torch.manual_seed(7)  # dropout masks, drawn in the same order in both
    exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned snapshot)
    monkeypatch.setattr(torch, "randn_like", randn_like)

    teacher_module = method_module("ua_mt")
    std, clip = hparams["noise_std"], hparams["noise_clip"]

    def our_noise(x, *_args, **_kwargs):
        return torch.clamp(noise.next("ours", x.shape, x.dtype) * std, -clip, clip)

    monkeypatch.setattr(sys.modules["agcl.methods.teacher"], "teacher_noise", our_noise)
    monkeypatch.setattr(teacher_module, "teacher_noise", our_noise)
    batch = Batch(volume_batch[:labeled_bs], label_batch[:labeled_bs],
                  volume_batch[labeled_bs:])
    torch.manual_seed(7)
    loss, logs = method.train_step(batch, iter_num)
    assert noise.served == {"theirs": 5, "ours": 5}  # 1 teacher input + T/2 = 4 passes

    torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
    torch.testing.assert_close(logs["loss_cons"], namespace["consistency_dist"], **CLOSE)
    torch.testing.assert_close(logs["loss_sup"], namespace["supervised_loss"], **CLOSE)
    assert logs["cons_weight"] == pytest.approx(namespace["consistency_weight"], rel=1e-15)
    assert logs["uncertainty_threshold"] == pytest.approx(namespace["threshold"], rel=1e-15)
    assert float(logs["mask_fraction"]) == float(namespace["mask"].mean())
    assert 0.05 < float(logs["mask_fraction"]) < 0.95, float(logs["mask_fraction"])

    # the engine's SGD (the unified SGD constants are the script's) and the EMA update
    assert_same_update(method, loss, ours_named, model, ema_model, lr=args.base_lr,
                       step=iter_num)


def test_the_hyperparameters_are_the_scripts(script):
    """Every constant our UA-MT declares that the script sets (argparse defaults and literals)."""
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    hparams = get_method("ua_mt").hparams_for("la", {})
    assert (hparams["ema_decay"], hparams["consistency"], hparams["consistency_rampup"]) == (
        args.ema_decay, args.consistency, args.consistency_rampup)
    assert "get_current_consistency_weight(iter_num//150)" in text
    assert hparams["rampup_epoch_iterations"] == 150
    assert re.search(r"T = (\d+)", text).group(1) == str(hparams["uncertainty_passes"])
    assert "torch.clamp(torch.randn_like(volume_batch_r) * 0.1, -0.2, 0.2)" in text
    assert (hparams["noise_std"], hparams["noise_clip"]) == (0.1, 0.2)
    assert "threshold = (0.75+0.25*ramps.sigmoid_rampup(iter_num, max_iterations))*np.log(2)" \
        in text
    assert hparams["threshold_floor"] == 0.75
    # the script's own EMA warm-up: alpha = min(1 - 1/(step + 1), decay)
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    copy = torch.nn.Linear(2, 2)
    copy.load_state_dict(teacher.state_dict())
    for step in (0, 5, 500):
        module.update_ema_variables(student, teacher, args.ema_decay, step)
        ema_update(copy, student, args.ema_decay, step)
        assert torch.equal(copy.weight, teacher.weight)
