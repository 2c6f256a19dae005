"""MC-Net+ against its reference code, ycwu1997/MC-Net code/train_mcnet_3d.py (cited script:N):
the script imported as a module (argparse at its defaults, so its own `args`, `sharpening` and
`get_current_consistency_weight`) and the body of its training loop (script:131-166, from
reading the batch to the optimiser step) read from its text and executed on the same tensors as
our method's train_step and the engine's SGD, with the reference's MCNet3d_v2 (three decoders:
transposed convolution, trilinear and nearest upsampling) mapped into ours.

Bridged, not changed: `.cuda()` is the identity; tensorboardX, nibabel and the dataset module
are stubs.
Compared: the loss, the Dice and mutual-consistency terms, the consistency weight (the script
ramps on iter_num after its increment), every gradient (through the sharpened targets too: its
index assignment keeps them in the graph), and the weights and BatchNorm statistics after SGD,
at iterations 0, 149 (the ramp's epoch turns at the increment) and 3000.
"""

from __future__ import annotations

import re

import pytest
import torch

from agcl.data.specs import SPECS
from agcl.methods import Batch
from agcl.methods.registry import get_method
from agcl.nets.vnet_sdf import _REFERENCE_MODULES
from tests.reference_code import (
    assert_same_update,
    import_script,
    reference_source,
    script_lines,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "ycwu1997/MC-Net", "train_mcnet_3d"
STUBS = ("tensorboardX", "dataloaders.dataset", "torchvision", "torchvision.transforms",
         "torchvision.utils", "nibabel")
PATCH, N_FILTERS = (32, 32, 32), 2
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


def ours_named(state: dict) -> dict:
    """MCNet3d_v2 names -> our mcnet3d's (encoder blocks, then each decoder's)."""
    out = {}
    for key, value in state.items():
        part, block, *rest = key.split(".")
        rest = ".".join(rest).removeprefix("conv.")
        if part == "encoder":
            out[f"{_REFERENCE_MODULES[block]}.{rest}"] = value
            continue
        decoder = int(part.removeprefix("decoder")) - 1
        target = "decoders.0.out_conv" if block == "out_conv" else _REFERENCE_MODULES[block]
        out[f"{target.replace('decoders.0', f'decoders.{decoder}')}.{rest}"] = value
    return out


@pytest.fixture
def script(monkeypatch):
    return import_script(monkeypatch, REPO, SCRIPT, "networks.VNet", stubs=STUBS)


def loop_body() -> str:
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "optimizer.step()")


@pytest.mark.parametrize("iter_num", [0, 149, 3000])
def test_one_step_equals_the_scripts_loop(script, iter_num):
    module, vnet = script
    args = module.args
    torch.manual_seed(0)
    model = vnet.MCNet3d_v2(n_channels=1, n_classes=2, n_filters=N_FILTERS,
                            normalization="batchnorm", has_dropout=True)
    cls = get_method("mc_net")
    method = cls(SPECS["la"], cls.hparams_for("la", {}), {"n_filters": N_FILTERS},
                 args.max_iteration)
    method.student.load_state_dict(ours_named(model.state_dict()))
    model.train(), method.train()

    gen = torch.Generator().manual_seed(iter_num)
    volume_batch = torch.randn(args.batch_size, 1, *PATCH, generator=gen)
    label_batch = (volume_batch[:, 0] > 0.2).long()
    labeled_bs = args.labeled_bs
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # script:117
    namespace = {**vars(module), "model": model, "optimizer": optimizer, "iter_num": iter_num,
                 "labeled_bs": labeled_bs, "dice_loss": module.losses.Binary_dice_loss,
                 "consistency_criterion": module.losses.mse_loss,  # script:121-122
                 "sampled_batch": {"image": volume_batch, "label": label_batch}}
    torch.manual_seed(7)  # the same dropout masks, drawn in the same order
    exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned snapshot)

    torch.manual_seed(7)
    loss, logs = method.train_step(Batch(volume_batch[:labeled_bs], label_batch[:labeled_bs],
                                         volume_batch[labeled_bs:]), iter_num)
    torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
    torch.testing.assert_close(logs["loss_dice"], namespace["loss_seg_dice"], **CLOSE)
    torch.testing.assert_close(logs["loss_mc"], namespace["loss_consist"], **CLOSE)
    assert logs["cons_weight"] == pytest.approx(namespace["consistency_weight"], rel=1e-15)
    assert logs["cons_weight"] > 0 and float(logs["loss_mc"]) > 0

    assert_same_update(method, loss, ours_named, model, lr=args.base_lr, step=iter_num)


def test_the_hyperparameters_are_the_scripts(script):
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    hparams = get_method("mc_net").hparams_for("la", {})
    assert (hparams["temperature"], hparams["consistency"], hparams["consistency_rampup"],
            hparams["dice_weight"]) == (args.temperature, args.consistency,
                                        args.consistency_rampup, args.lamda)
    assert re.search(r"iter_num = iter_num \+ 1\s+consistency_weight = "
                     r"get_current_consistency_weight\(iter_num//150\)", text)
    assert hparams["rampup_epoch_iterations"] == 150 and not hparams["detach_targets"]
