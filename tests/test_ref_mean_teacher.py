"""Mean Teacher against its 2D reference code, HiLab-git/SSL4MIS code/train_mean_teacher_2D.py
(cited script:N): the script imported as a module (argparse at its defaults: its own `args`,
`get_current_consistency_weight`, `update_ema_variables`) and the body of its training loop
(script:150-179, from reading the batch to the EMA update) read from its text and executed on
the same tensors as our method's train_step, the engine's SGD and our EMA update.

Bridged, not changed: `.cuda()` is the identity; torchvision, tensorboardX and cv2 are stubs and
networks.net_factory a stand-in (its optional backbones need packages the script's loop never
uses); the script's one torch.randn_like draw (the teacher's input noise) and our stream's draw
return the same normals, so torch's global RNG (dropout) is consumed alike. Compared: loss,
supervised and consistency terms, the consistency weight, every student gradient, and the
student's and teacher's weights and BatchNorm statistics after the step, at iterations 500
(inside the script's silent start, iter_num < 1000), 1000 and 3000, at ACDC's 4 classes with
SSL4MIS's full-width U-Net on 64x64 slices.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.nn.modules.loss import CrossEntropyLoss

from agcl.data.specs import SPECS
from agcl.methods import Batch
from agcl.methods.registry import get_method
from tests.reference_code import (
    assert_same_update,
    import_ssl4mis_2d_script,
    reference_source,
    script_lines,
)
from tests.test_ref_ss_net import reference_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "HiLab-git/SSL4MIS", "train_mean_teacher_2D"
SIZE, NUM_CLASSES = (64, 64), 4
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


def ours_named(state: dict) -> dict:
    """SSL4MIS UNet names -> ours (the SS-Net test's map, whose UNet is SSL4MIS's)."""
    theirs = {reference_key(f"student.{name}", 2): name for name in OURS_NAMES}
    return {theirs[key]: value for key, value in state.items() if key in theirs}


OURS_NAMES: list[str] = []


@pytest.fixture
def script(monkeypatch):
    return import_ssl4mis_2d_script(monkeypatch, SCRIPT)


def loop_body() -> str:
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "update_ema_variables(model, ema_model, args.ema_decay, iter_num)")


@pytest.mark.parametrize("iter_num", [500, 1000, 3000])
def test_one_step_equals_the_scripts_loop(script, monkeypatch, iter_num):
    module, unet = script
    args = module.args
    torch.manual_seed(0)
    model = unet.UNet(in_chns=1, class_num=NUM_CLASSES)
    ema_model = unet.UNet(in_chns=1, class_num=NUM_CLASSES)
    for param in ema_model.parameters():
        param.detach_()
    cls = get_method("mean_teacher")
    hparams = cls.hparams_for("acdc", {"consistency_start": 1000})  # reference.yaml's
    method = cls(SPECS["acdc"], hparams, {}, args.max_iterations)
    OURS_NAMES[:] = list(method.student.state_dict())
    method.student.load_state_dict(ours_named(model.state_dict()))
    method.teacher.load_state_dict(ours_named(ema_model.state_dict()))
    model.train(), ema_model.train(), method.train()

    gen = torch.Generator().manual_seed(iter_num)
    volume_batch = torch.randn(4, 1, *SIZE, generator=gen)
    label_batch = torch.randint(0, NUM_CLASSES, (4, *SIZE), generator=gen)
    noise = torch.randn(2, 1, *SIZE, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # script:135-136
    args.labeled_bs = 2
    namespace = {**vars(module), "args": args, "model": model, "ema_model": ema_model,
                 "optimizer": optimizer, "iter_num": iter_num, "ce_loss": CrossEntropyLoss(),
                 "dice_loss": module.losses.DiceLoss(NUM_CLASSES),
                 "sampled_batch": {"image": volume_batch, "label": label_batch}}
    randn_like = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda x, *a, **k: noise.clone())
    torch.manual_seed(7)
    exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned snapshot)
    monkeypatch.setattr(torch, "randn_like", randn_like)

    std, clip = hparams["noise_std"], hparams["noise_clip"]
    monkeypatch.setattr(sys.modules["agcl.methods.teacher"], "teacher_noise",
                        lambda x, *a, **k: torch.clamp(noise * std, -clip, clip))
    torch.manual_seed(7)
    loss, logs = method.train_step(Batch(volume_batch[:2], label_batch[:2], volume_batch[2:]),
                                   iter_num)
    torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
    torch.testing.assert_close(logs["loss_sup"], namespace["supervised_loss"], **CLOSE)
    weight = namespace["consistency_weight"] if iter_num >= 1000 else 0.0
    assert logs["cons_weight"] == pytest.approx(weight, rel=1e-15)
    if iter_num >= 1000:
        torch.testing.assert_close(logs["loss_cons"], namespace["consistency_loss"], **CLOSE)
        assert weight > 0

    assert_same_update(method, loss, ours_named, model, ema_model, lr=args.base_lr,
                       step=iter_num)


def test_the_hyperparameters_are_the_scripts(script):
    """The constants our ACDC Mean Teacher takes from the script (argparse defaults, literals)."""
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    hparams = get_method("mean_teacher").hparams_for("acdc", {})
    assert (hparams["ema_decay"], hparams["consistency"], hparams["consistency_rampup"]) == (
        args.ema_decay, args.consistency, args.consistency_rampup)
    assert "torch.clamp(torch.randn_like(\n                unlabeled_volume_batch) * 0.1, -0.2, 0.2)" \
        in text and (hparams["noise_std"], hparams["noise_clip"]) == (0.1, 0.2)
    assert "if iter_num < 1000:\n                consistency_loss = 0.0" in text
    assert "get_current_consistency_weight(iter_num//150)" in text
    assert hparams["rampup_epoch_iterations"] == 150
