"""ss_net's whole step against SS-Net's training scripts as they run (ycwu1997/SS-Net, the commit
pinned in reference_code; cited 3d:N = code/train_ss_3d.py, 2d:N = code/train_ss_2d.py).

Each script is imported as a module (argparse at its defaults: its own `args`, `num_classes`,
`base_lr` and `get_current_consistency_weight`); its setup lines are executed (3d:76 and 2d:90 the
FeatureMemory, 3d:92-94 and 2d:93-96 the Dice, VAT and SGD; 2d:64-66 its locals) and then the body
of its training loop, read from its text: 3d:105-181 (reading the batch to optimizer.step()) and
3d:232-235 (the lr change), 2d:108-172 (reading the batch to the iter_num increment after the
step). Two consecutive steps on the same batches, dropout masks and VAT start directions as our
ss_net's train_step and the engine's optimiser at the reference protocol's recipe
(config/reference.yaml): LA from 0-based steps 0 (the memory empty, as the script starts), 148 (its
ramp's epoch turns between the two steps: iter_num 149, 150 after the increment) and 2499 (the step
after which the script divides its lr by 10, so the second step trains at 0.001), ACDC from 0 and
149 (its ramp's epoch turns between the two steps: iter_num 149, 150 before it), at the script's
batch (LA 4 (2 labeled), ACDC 24 (12)).
Compared after each step: the loss, every logged term (Dice, CE, LDS, both contrastive terms,
the ramp weight), the gradient of every parameter (net and heads), the weights and every BatchNorm
statistic after the SGD step, the memory, and the lr.

Bridged, not changed (helpers imported from tests/test_ref_ss_net.py): the reference nets are
SS-Net's VNet at width 4 (its projection head's fixed dim_in 16 resized) on 16^3 patches and its
full-width UNet on 32x32 slices, BatchNorm perturbed, state mapped onto ours by reference_key;
the VAT start direction (losses.py:105,138 torch.rand on the global generator) is the draw of
our "vat_noise" stream, injected through TorchDrawing; `.cuda()` is the identity; tensorboardX,
torchvision, nibabel and the dataset module are stubs and the SummaryWriter a no-op; float64.
"""

from __future__ import annotations

import copy
import inspect
import re
import textwrap

import numpy as np
import pytest
import torch

from agcl.config import load_config
from agcl.config.recipe import resolve_recipe
from agcl.data.specs import SPECS
from agcl.engine.optimizers import main_optimizer
from agcl.engine.update import learning_rate
from agcl.methods import Batch
from agcl.methods.registry import get_method
from tests.conftest import REPO_ROOT
from tests.reference_code import import_script, reference_source, script_lines
from tests.test_ref_ss_net import (
    CASES,
    CLOSE,
    F64,
    TorchDrawing,
    assert_states_equal,
    mapped_grads,
    perturb_batchnorm,
    reference_key,
    reference_net,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "ycwu1997/SS-Net"
SCRIPTS = {"la": "train_ss_3d", "acdc": "train_ss_2d"}
STUBS = ("tensorboardX", "torchvision", "torchvision.transforms", "dataloaders.dataset",
         "nibabel")
# our log name -> the script's variable
TERMS = {"la": {"loss_dice": "loss_seg_dice", "loss_ce": "loss_seg", "loss_lds": "loss_lds",
                "loss_cl_l": "loss_contr_labeled", "loss_cl_u": "loss_contr_unlabeled",
                "cons_weight": "consistency_weight"}}
TERMS["acdc"] = {**TERMS["la"], "loss_ce": "loss_seg_ce"}


@pytest.fixture
def scripts(monkeypatch):
    """name -> the imported script module. Their module-level side effects on this process
    (CUDA_VISIBLE_DEVICES at 3d:47, cudnn flags at 3d:52-53) are undone after the test."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic",
                        torch.backends.cudnn.deterministic)
    return {dataset: import_script(monkeypatch, REPO, script, stubs=STUBS)
            for dataset, script in SCRIPTS.items()}


def recipe(dataset: str):
    return resolve_recipe(load_config(REPO_ROOT / "config" / "reference.yaml"), dataset, "ss_net")


def setup_lines(dataset: str) -> str:
    script = SCRIPTS[dataset]
    if dataset == "la":  # inside `if __name__ == "__main__":`
        return "\n".join([
            script_lines(REPO, script, "prototype_memory = feature_memory.FeatureMemory(",
                         "n_classes=num_classes)"),
            script_lines(REPO, script, "dice_loss = losses.Binary_dice_loss",
                         "weight_decay=0.0001)")])
    after = "def train(args, snapshot_path):"
    return "\n".join([
        script_lines(REPO, script, "base_lr = args.base_lr", "max_iterations = args.max_iterations",
                     after=after),
        script_lines(REPO, script, "prototype_memory = feature_memory.FeatureMemory(",
                     "n_classes=num_classes)", after=after),
        script_lines(REPO, script, "optimizer = optim.SGD(", "losses.VAT2d(epi=args.magnitude)",
                     after=after)])


def loop_lines(dataset: str) -> str:
    script = SCRIPTS[dataset]
    body = script_lines(REPO, script, "volume_batch, label_batch = sampled_batch['image']",
                        "optimizer.step()" if dataset == "la" else "iter_num = iter_num + 1\n")
    # 3d:120 is a comment indented by a tab, which leaves the block without a common margin for
    # script_lines' dedent: tabs to 8 columns, as Python reads them, then dedent
    body = textwrap.dedent(body.expandtabs(8))
    if dataset == "la":  # 3d:231-235, the lr change after the step
        body += "\n" + script_lines(REPO, script, "if iter_num % 2500 == 0:",
                                    "param_group['lr'] = lr_")
    return body


class Writer:
    """SummaryWriter's calls in the loop lines, as no-ops."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def step_labels(model, x, num_classes, gen, avoid_last):
    """The labels of a batch: the net's own prediction (train mode, the step's dropout seed) on
    70 % of the voxels, random elsewhere, so that the memory fills (> 32 per class: the
    selector's sort); with avoid_last, the last class is never predicted correctly, so that it
    keeps an earlier memory."""
    with torch.no_grad():
        torch.manual_seed(123)
        prediction = copy.deepcopy(model).train()(x)[0].argmax(1)
    labels = torch.where(torch.rand(prediction.shape, generator=gen) < 0.7, prediction,
                         torch.randint(0, num_classes, prediction.shape, generator=gen))
    if avoid_last:
        last = num_classes - 1
        labels[(prediction == last) & (labels == last)] = 0
    return labels


STARTS = [("la", 0), ("la", 148), ("la", 2499), ("acdc", 0), ("acdc", 149)]


@pytest.mark.parametrize(("dataset", "start"), STARTS)
def test_two_steps_equal_the_scripts_loop(scripts, monkeypatch, dataset, start):
    module = scripts[dataset]
    args = module.args
    shape, num_classes, net_kwargs = CASES[dataset]
    dims = len(shape) - 2
    batch_size, labeled_bs = args.batch_size, args.labeled_bs

    torch.manual_seed(0)
    model = reference_net(dataset).double()
    perturb_batchnorm(model, 1)
    namespace = {**vars(module), "args": args, "model": model, "writer": Writer()}
    exec(setup_lines(dataset), namespace)  # noqa: S102 (the reference's own lines, pinned)
    assert namespace["num_classes"] == num_classes == SPECS[dataset].num_classes
    memory, optimizer = namespace["prototype_memory"], namespace["optimizer"]

    ours_recipe = recipe(dataset)
    train_cfg = ours_recipe.train_cfg
    assert (train_cfg["batch_size"], train_cfg["labeled_batch_size"]) == (batch_size, labeled_bs)
    (stage,) = ours_recipe.stages
    cls = get_method("ss_net")
    method = cls(SPECS[dataset], dict(ours_recipe.hparams), net_kwargs,
                 stage.iterations).double().train()
    state = model.state_dict()
    mapped = {k: state[reference_key(k, dims)] for k in method.state_dict()
              if k.startswith(("student.", "heads."))}
    assert len(mapped) == len(state)
    assert set(method.load_state_dict(mapped, strict=False).missing_keys) == {
        "memory", "memory_count"}
    ours_optimizer = main_optimizer(method, train_cfg)
    set_to_none = train_cfg["grad_reset"] == "none"

    gen = torch.Generator().manual_seed(16 + start)
    if start:  # an earlier step's memory, the same on both sides
        for c in range(1, num_classes):
            rows = torch.randn(10 + c, method.hparams["feat_dim"], generator=gen, dtype=F64)
            memory.memory[c] = rows.numpy().copy()
            method.memory[c, :len(rows)] = rows
            method.memory_count[c] = len(rows)
    namespace["iter_num"] = start
    for step in (start, start + 1):
        x = torch.randn(batch_size, *shape[1:], generator=gen, dtype=F64)
        labels = step_labels(model, x, num_classes, gen, avoid_last=bool(start) and num_classes > 2)
        # the VAT start direction ours draws from its stream, handed to the script's VAT
        stream = method.streams.torch("vat_noise", "cpu")
        saved = stream.get_state()
        noise = torch.rand(x.shape, generator=stream, dtype=F64)
        stream.set_state(saved)
        monkeypatch.setattr(module.losses, "torch", TorchDrawing(noise))
        namespace["sampled_batch"] = {"image": x, "label": labels}
        lr = learning_rate(stage.schedule, step, stage.iterations)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-15)
        torch.manual_seed(123)  # the same dropout masks on both sides, drawn in the same order
        exec(loop_lines(dataset), namespace)  # noqa: S102 (the reference's own loop lines)
        assert namespace["iter_num"] == step + 1

        torch.manual_seed(123)
        loss, logs = method.train_step(Batch(x[:labeled_bs], labels[:labeled_bs],
                                             x[labeled_bs:]), step)
        torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
        assert set(logs) == set(TERMS[dataset])
        for ours, theirs in TERMS[dataset].items():
            torch.testing.assert_close(torch.as_tensor(logs[ours], dtype=F64),
                                       torch.as_tensor(namespace[theirs], dtype=F64), **CLOSE,
                                       msg=lambda m, ours=ours: f"{ours}: {m}")
        assert logs["cons_weight"] > 0 and logs["loss_cl_l"] > 0 and logs["loss_cl_u"] > 0

        for group in ours_optimizer.param_groups:
            group["lr"] = lr
        ours_optimizer.zero_grad(set_to_none=set_to_none)
        loss.backward()
        for name, grad, ref_grad in mapped_grads(method, model, dims):
            if ref_grad is None:  # the memory selectors of classes without a memory
                assert grad is None or not grad.any(), name
            else:
                torch.testing.assert_close(grad, ref_grad, **CLOSE, msg=name)
        ours_optimizer.step()
        method.after_optimizer_step(step)
        # the weights and every running statistic (net: main and clean VAT passes; heads)
        for prefix, net in [("student.", method.student), ("heads.", method.heads)]:
            assert_states_equal(net, model, dims, prefix)
        # the memory: replaced where the step predicted a class correctly, kept elsewhere
        counts = method.memory_count.tolist()
        assert counts[0] == 0 and memory.memory[0] is None
        # (bit-equal after the first step; after the second, the heads' weights are equal to
        # float64 rounding, and so are the projected rows)
        for c in range(1, num_classes):
            torch.testing.assert_close(method.memory[c, :counts[c]],
                                       torch.from_numpy(memory.memory[c]), **CLOSE,
                                       msg=lambda m, c=c: f"memory of class {c}: {m}")
            if step == start:
                np.testing.assert_array_equal(method.memory[c, :counts[c]].numpy(),
                                              memory.memory[c])
        assert counts[1] == method.hparams["memory_per_class"] == memory.elements_per_class
        if start and num_classes > 2:
            assert counts[-1] == 10 + num_classes - 1  # kept from the earlier step
    # the lr the script set after the second step is the one our schedule gives the third
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        learning_rate(stage.schedule, start + 2, stage.iterations), rel=1e-15)
    if (dataset, start) == ("la", 2499):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(args.base_lr / 10)


def test_the_hyperparameters_are_the_scripts(scripts):
    """Every constant our ss_net trains LA and ACDC with (reference protocol), read from the
    scripts' argparse and text and from losses.py / feature_memory.py."""
    losses_text = reference_source(REPO, "utils/losses.py")
    for dataset, script in SCRIPTS.items():
        module = scripts[dataset]
        args = module.args
        text = reference_source(REPO, f"{script}.py")
        ours = recipe(dataset)
        hp, train = ours.hparams, ours.train_cfg
        (stage,) = ours.stages
        assert (hp["consistency"], hp["consistency_rampup"], hp["vat_epsilon"]) == (
            args.consistency, args.consistency_rampup, args.magnitude)
        vat = module.losses.VAT3d if dataset == "la" else module.losses.VAT2d
        defaults = {k: v.default for k, v in inspect.signature(vat.__init__).parameters.items()}
        assert (hp["vat_xi"], hp["vat_power_iterations"]) == (defaults["xi"], defaults["ip"])
        assert f"adv_loss=losses.VAT{3 if dataset == 'la' else 2}d(epi=args.magnitude)" in text
        (size,) = re.findall(r"FeatureMemory\(elements_per_class=(\d+), n_classes=num_classes\)",
                             text)
        assert hp["memory_per_class"] == int(size)
        (weight,) = re.findall(r"loss = +loss_seg_dice \+ consistency_weight \* \(loss_lds \+ "
                               r"([0-9.]+) \* \(loss_contr_labeled \+ loss_contr_unlabeled\)\)",
                               text)
        assert hp["contrastive_weight"] == float(weight)
        (epoch,) = re.findall(r"get_current_consistency_weight\(iter_num//(\d+)\)", text)
        assert hp["rampup_epoch_iterations"] == int(epoch)
        increment = text.index("iter_num = iter_num + 1")
        ramp = text.index("consistency_weight = get_current_consistency_weight(")
        assert hp["rampup_iteration_offset"] == (1 if increment < ramp else 0)
        assert "return args.consistency * ramps.sigmoid_rampup(epoch, args.consistency_rampup)" \
            in text
        dice = "losses.Binary_dice_loss" if dataset == "la" else "losses.DiceLoss(n_classes="
        assert f"dice_loss = {dice}" in text
        assert (hp["dice_form"], hp["vat_distance"]) == (("linear",) * 2 if dataset == "la"
                                                         else ("batch_squared",) * 2)
        # the optimiser and the schedule
        assert "optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0001)" \
            in text
        assert (train["lr"], train["momentum"], train["weight_decay"]) == (args.base_lr, 0.9,
                                                                           0.0001)
        iterations = args.max_iteration if dataset == "la" else args.max_iterations
        assert (train["iterations"], train["batch_size"], train["labeled_batch_size"]) == (
            iterations, args.batch_size, args.labeled_bs)
        if dataset == "la":
            assert "if iter_num % 2500 == 0:\n                lr_ = base_lr * 0.1 ** " \
                "(iter_num // 2500)" in text
            assert (stage.schedule["schedule"], stage.schedule["step_size"],
                    stage.schedule["gamma"]) == ("step", 2500, 0.1)
        else:
            assert "param_group['lr']" not in text and stage.schedule["schedule"] == "constant"
    assert "self.loss = softDiceLoss(4)" in losses_text and "self.loss = Binary_dice_loss" \
        in losses_text
