"""BCP's self-training step against its reference code, DeepMed-Lab-ECNU/BCP
code/LA_BCP_train.py (cited script:N): the script imported as a module (argparse at its
defaults: its own `args`, `get_cut_mask`, `context_mask`, `mix_loss`, `update_ema_variables`) and
the body of self_train's loop (script:235-269, from reading the batch to the EMA update) read
from its text and executed on the same tensors as our method's train_step, the engine's SGD and
our EMA update, its VNet mapped into ours.

Bridged, not changed: `.cuda()` is the identity; modules the loop never uses (tensorboardX,
torchvision, nibabel, cv2, and the dataset and net-factory modules) are stubs, and the
tensorboard writer a no-op; the box corner that context_mask draws with np.random.randint is the
one our "box_mask" stream returns (the same three integers in the same order). Compared: the
loss, every gradient, the student's weights and BatchNorm statistics after SGD and the teacher's
after the EMA update, at the script's 112x112x80 patch (context_mask's bounds are written for it),
width 2, batch 8 (4 labeled).
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
    assert_same_update,
    import_script,
    reference_source,
    script_lines,
    teacher_in_pieces,
)
from tests.test_ref_ss_net import reference_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "DeepMed-Lab-ECNU/BCP", "LA_BCP_train"
STUBS = ("tensorboardX", "torchvision", "torchvision.transforms", "nibabel", "cv2",
         "dataloaders.dataset", "networks.net_factory", "utils.test_3d_patch")
PATCH, N_FILTERS = (112, 112, 80), 2
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture
def script(monkeypatch):
    return import_script(monkeypatch, REPO, SCRIPT, "networks.VNet", stubs=STUBS)


def loop_body() -> str:
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "update_ema_variables(model, ema_model, 0.99)", after="def self_train(")


class Corners:
    """The box corners both draw: np.random.randint in the script, our stream's integers."""

    def __init__(self, values):
        self.values, self.served = list(values), {"theirs": 0, "ours": 0}

    def draw(self, who: str, low: int, high: int) -> int:
        value = self.values[self.served[who]]
        self.served[who] += 1
        assert low <= value < high, (who, low, value, high)
        return value


def mapped(state: dict, ours_names) -> dict:
    theirs = {reference_key(f"student.{name}", 3): name for name in ours_names}
    return {theirs[key]: value for key, value in state.items() if key in theirs}


@pytest.mark.parametrize("iter_num", [0, 2500])
def test_one_self_training_step_equals_the_scripts_loop(script, monkeypatch, iter_num):
    module, vnet = script
    args = module.args
    torch.manual_seed(0)
    model = vnet.VNet(n_channels=1, n_classes=2, n_filters=N_FILTERS, normalization="batchnorm",
                      has_dropout=True)
    ema_model = vnet.VNet(n_channels=1, n_classes=2, n_filters=N_FILTERS,
                          normalization="batchnorm", has_dropout=True)
    # a teacher whose pseudo-labels hold foreground and background in many pieces (one unlabeled
    # image of the first pair is all background, the other in ~170 components: the largest-
    # component step of get_cut_mask(nms=1) matters)
    teacher_in_pieces(ema_model, model, ema_model.decoder.out_conv)
    with torch.no_grad():
        ema_model.decoder.out_conv.bias[1] -= 0.4
    cls = get_method("bcp")
    method = cls(SPECS["la"], cls.hparams_for("la", {}), {"n_filters": N_FILTERS},
                 args.self_max_iteration)
    # the main stage starts the teacher as a copy of the pre-trained student (the script loads
    # one file into both); the weights compared are loaded after that
    method.start_stage("main", fresh=True)
    names = list(method.student.state_dict())
    method.student.load_state_dict(mapped(model.state_dict(), names))
    method.teacher.load_state_dict(mapped(ema_model.state_dict(), names))
    model.train(), ema_model.train(), method.train()

    gen = torch.Generator().manual_seed(1 + iter_num)
    volume_batch = torch.randn(args.batch_size, 1, *PATCH, generator=gen)
    label_batch = (volume_batch[:, 0] > 0.3).long()
    corners = Corners([5, 20, 7])
    module_np = types.SimpleNamespace(random=types.SimpleNamespace(
        randint=lambda low, high: corners.draw("theirs", low, high)))
    context_globals = module.context_mask.__globals__
    monkeypatch.setitem(context_globals, "np", module_np)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # script:223
    writer = types.SimpleNamespace(add_scalar=lambda *a, **k: None)
    namespace = {**vars(module), "model": model, "ema_model": ema_model, "writer": writer,
                 "optimizer": optimizer, "iter_num": iter_num, "sub_bs": args.labeled_bs // 2,
                 "sampled_batch": {"image": volume_batch, "label": label_batch}}
    torch.manual_seed(7)  # dropout masks, drawn in the same order in both
    exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned snapshot)
    assert corners.served["theirs"] == 3

    stream = types.SimpleNamespace(integers=lambda low, high: corners.draw("ours", low, high))
    monkeypatch.setattr(method.streams, "numpy", lambda purpose: stream)
    labeled = args.labeled_bs
    torch.manual_seed(7)
    loss, _ = method.train_step(Batch(volume_batch[:labeled], label_batch[:labeled],
                                      volume_batch[labeled:]), iter_num)
    assert corners.served["ours"] == 3
    torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
    plab = namespace["plab_a"]
    assert 0 < float(plab.float().mean()) < 1  # the pseudo-labels hold both classes

    assert_same_update(method, loss, lambda state: mapped(state, names), model, ema_model,
                       lr=args.base_lr, step=iter_num)


def test_the_hyperparameters_are_the_scripts(script):
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    hparams = get_method("bcp").hparams_for("la", {})
    assert (hparams["pretrain_iterations"], hparams["u_weight"], hparams["mask_ratio"]) == (
        args.pre_max_iteration, args.u_weight, args.mask_ratio)
    assert "plab_a = get_cut_mask(unoutput_a, nms=1)" in text and hparams["largest_component"]
    assert "def get_cut_mask(out, thres=0.5, nms=0):" in text
    assert hparams["foreground_threshold"] == 0.5 and hparams["pseudo_label"] == "threshold"
    assert "update_ema_variables(model, ema_model, 0.99)" in text and hparams["ema_decay"] == 0.99
    assert np.isclose(args.mask_ratio, 2 / 3)
