"""DTC (baselines/dtc.py) against HiLab-git/DTC's own code.

The script is imported as a module (argparse at its defaults: its own args, compute_sdf, losses
and ramp) and its loop lines (train_la_dtc.py:169-195, from reading the batch to the optimiser
step) are executed on the same tensors as our method's train_step; its literals and argparse
defaults are also read from its source. Our method's student is loaded with the reference's
weights; one step at several iterations must give exactly the same loss terms, the same gradient
of every parameter and, after the same SGD update, the same weights. The net and compute_sdf have
their own equality tests (tests/test_ref_sdf.py).
"""
from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import torch

from agcl.data.specs import SPECS
from agcl.engine.update import learning_rate
from agcl.methods import Batch
from agcl.methods.registry import get_method, method_module
from agcl.nets.vnet_sdf import from_reference_state_dict
from tests.reference_code import import_script, reference_source
from tests.reference_code import script_lines as script_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "HiLab-git/DTC"
SCRIPT = "train_la_dtc.py"
PATCH = (32, 32, 16)
N_FILTERS = 4


def script_defaults() -> dict:
    """--name -> default of every parser.add_argument of the reference script."""
    defaults = {}
    for node in ast.walk(ast.parse(reference_source(REPO, SCRIPT))):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            default = next(k.value for k in node.keywords if k.arg == "default")
            defaults[node.args[0].value.lstrip("-")] = ast.literal_eval(default)
    return defaults


def script_lines() -> str:
    return re.sub(r"\s+", "", reference_source(REPO, SCRIPT))


def test_defaults_are_the_scripts():
    args = script_defaults()
    source = script_lines()
    hp = get_method("dtc").hparams_for("la")
    assert hp["beta"] == args["beta"] == 0.3
    assert hp["consistency"] == args["consistency"] == 1.0
    assert hp["consistency_rampup"] == args["consistency_rampup"] == 40.0
    assert "dis_to_mask=torch.sigmoid(-1500*outputs_tanh)" in source
    assert hp["transform_k"] == 1500
    assert "get_current_consistency_weight(iter_num//150)" in source
    assert hp["rampup_epoch_iterations"] == 150
    assert "supervised_loss=loss_seg_dice+args.beta*loss_sdf" in source
    assert "loss=supervised_loss+consistency_weight*consistency_loss" in source
    assert "consistency_loss=torch.mean((dis_to_mask-outputs_soft)**2)" in source
    # The recipe of config/reference.yaml's train_by_method entry.
    assert (args["max_iterations"], args["batch_size"], args["labeled_bs"], args["base_lr"]) == (
        6000, 4, 2, 0.01)
    assert "optim.SGD(model.parameters(),lr=base_lr,momentum=0.9,weight_decay=0.0001)" in source
    assert "lr_=base_lr*0.1**(iter_num//2500)" in source


def reference_lr(iterations: int, base_lr: float = 0.01) -> list[float]:
    """The lr each iteration trains with under train_la_dtc.py:161,200,251-254."""
    lrs, lr_ = [], base_lr
    for iter_num in range(1, iterations + 1):
        lrs.append(lr_)  # the optimiser step of this iteration
        if iter_num % 2500 == 0:
            lr_ = base_lr * 0.1 ** (iter_num // 2500)
    return lrs


def test_step_schedule_equals_the_scripts():
    schedule = {"lr": 0.01, "schedule": "step", "step_size": 2500, "gamma": 0.1}
    ours = [learning_rate(schedule, step, 6000) for step in range(6000)]
    assert ours == pytest.approx(reference_lr(6000), rel=1e-12)
    assert ours[2499] == 0.01 and ours[2500] == pytest.approx(0.001)


def loop_body() -> str:
    """train_la_dtc.py:169-195, from reading the batch to the optimiser step, as it runs."""
    return script_text(REPO, SCRIPT.removesuffix(".py"),
                        "volume_batch, label_batch = sampled_batch['image']", "optimizer.step()")


def labels(n: int) -> torch.Tensor:
    """Blobs of foreground (one per sample, various sizes), so that every sdf is non-trivial."""
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in PATCH), indexing="ij"))
    centres = [(12, 20, 8, 7), (25, 9, 5, 9), (16, 16, 8, 12), (5, 5, 3, 4)]
    out = [((grid - np.array(c[:3])[:, None, None, None]) ** 2).sum(0) <= c[3] ** 2
           for c in centres[:n]]
    return torch.from_numpy(np.stack(out).astype(np.int64))


@pytest.mark.parametrize("step", [0, 149, 150, 3000, 5999])
def test_one_training_step_equals_the_reference(step, monkeypatch):
    """The script imported as a module (its args, get_current_consistency_weight, compute_sdf,
    losses) and its loop lines executed against our train_step and the engine's SGD, exactly:
    loss, every logged term, every gradient, weights and BatchNorm statistics after the step."""
    pytest.importorskip("skimage")  # the reference's compute_sdf imports it
    module, vnet_sdf = import_script(monkeypatch, REPO, SCRIPT.removesuffix(".py"),
                                     "networks.vnet_sdf",
                                     stubs=("tensorboardX", "torchvision",
                                            "torchvision.transforms", "torchvision.utils"))
    args = module.args
    torch.manual_seed(0)
    model = vnet_sdf.VNet(n_channels=1, n_classes=2 - 1, n_filters=N_FILTERS,
                          normalization="batchnorm", has_dropout=True)
    cls = get_method("dtc")
    method = cls(SPECS["la"], cls.hparams_for("la"), {"n_filters": N_FILTERS},
                 args.max_iterations)
    method.student.load_state_dict(from_reference_state_dict(model.state_dict()))
    model.train()
    method.train()

    gen = torch.Generator().manual_seed(step)
    volume_batch = torch.randn(4, 1, *PATCH, generator=gen)
    label_batch = labels(4)  # the reference's loader labels the unlabeled half too: unused
    batch = Batch(volume_batch[:2], label_batch[:2], volume_batch[2:])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
                                weight_decay=0.0001)  # train_la_dtc.py:144-145
    namespace = {**vars(module), "model": model, "optimizer": optimizer, "iter_num": step,
                 "ce_loss": torch.nn.BCEWithLogitsLoss(), "mse_loss": torch.nn.MSELoss(),
                 "sampled_batch": {"image": volume_batch, "label": label_batch}}
    torch.manual_seed(11)  # the same dropout masks in both
    exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned snapshot)
    torch.manual_seed(11)
    loss, logs = method.train_step(batch, step)

    theirs = {"loss_sdf": "loss_sdf", "loss_bce": "loss_seg", "loss_dice": "loss_seg_dice",
              "loss_cons": "consistency_loss", "loss_sup": "supervised_loss",
              "cons_weight": "consistency_weight"}
    torch.testing.assert_close(loss, namespace["loss"], rtol=0, atol=0)
    for ours, name in theirs.items():
        torch.testing.assert_close(torch.as_tensor(logs[ours]),
                                   torch.as_tensor(namespace[name]), rtol=0, atol=0, msg=ours)
    assert set(logs) == set(theirs)
    assert namespace["consistency_loss"] > 0 and namespace["loss_sdf"] > 0

    # The same gradient of every parameter, then the same SGD update.
    opt = torch.optim.SGD(method.trainable_parameters(), lr=args.base_lr, momentum=0.9,
                          weight_decay=1e-4)
    opt.zero_grad()
    loss.backward()
    ref_grads = from_reference_state_dict({n: p.grad for n, p in model.named_parameters()})
    for name, p in method.student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=0, msg=name)
    opt.step()
    after = from_reference_state_dict(model.state_dict())  # weights and BatchNorm statistics
    for name, value in method.student.state_dict().items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0, msg=name)


def test_consistency_reaches_both_heads_undetached():
    """The dual-task term alone has gradients on the sdf conv and on the segmentation conv."""
    cls = get_method("dtc")
    torch.manual_seed(0)
    method = cls(SPECS["la"], cls.hparams_for("la"), {"n_filters": 2}, 6000).train()
    x = torch.randn(2, 1, *PATCH)
    sdf, seg = method.student.forward_sdf(x)
    # k = 1500 saturates the transform except within ~1/k of the zero level set, where an
    # untrained net has few voxels: a small k shows the gradient's path.
    method_module("dtc").dual_task_consistency(sdf, torch.sigmoid(seg), 1.0).backward()
    head = method.student.decoders[0]
    assert head.sdf_conv.weight.grad.abs().sum() > 0
    assert head.out_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dataset", ["acdc", "crag"])
def test_a_2d_dataset_is_refused_with_a_clear_message(dataset):
    cls = get_method("dtc")
    spec = SPECS[dataset]
    assert "dtc is 3D only" in cls.unsupported(spec)
    assert "no reference ships a 2D DTC" in cls.unsupported(spec)
    assert cls.unsupported(SPECS["la"]) is None
    assert cls.net_name(SPECS["la"]) == "vnet_sdf"
