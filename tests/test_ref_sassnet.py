"""SASSNet against its reference code (kleinzcy/SASSnet, code/train_gan_sdfloss.py, cited as
train:N; networks/discriminator.py; networks/vnet_sdf.py; utils/{losses,util,ramps}.py).

- The discriminator: FC3DDiscriminator's outputs (eval and train mode, same dropout masks) and
  gradients, its state dict mapped into ours, at the reference's 112x112x80 patch, where its
  fixed AvgPool3d((7, 7, 5)) is defined.
- The net's loss (train:156-176): Dice + beta * MSE(tanh, SDF) + w(t) * CE(D(unlabeled maps), 1),
  assembled from the reference's own functions and nets, values and every gradient.
- Whole iterations (train:150-202): the script imported as a module and its own loop body (SGD
  step of the net, then the discriminator's Adam step on the updated net's eval-mode maps), read
  from its text and executed, against the engine's Updater with our method, two iterations from
  the same weights, same dropout masks: same losses, same net and discriminator weights after.
- The optimiser constants, read from the script's text; ten Adam steps of the discriminator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agcl.data.specs import SPECS
from agcl.engine.optimizers import auxiliary_optimizers, main_optimizer
from agcl.engine.state import TrainingState
from agcl.engine.update import Updater
from agcl.methods.base import Batch
from agcl.methods.registry import get_method
from agcl.nets.discriminator import ShapeDiscriminator3d
from agcl.nets.discriminator import from_reference_state_dict as discriminator_state
from agcl.nets.vnet_sdf import from_reference_state_dict as vnet_state
from tests.reference_code import reference_modules

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "kleinzcy/SASSnet"
PATCH = (112, 112, 80)  # the reference discriminator's pool needs it
NDF, N_FILTERS = 4, 2


def reference_discriminator(ndf: int = NDF):
    module = reference_modules(REPO, "networks.discriminator")
    return module.FC3DDiscriminator(num_classes=1, ndf=ndf)


def test_discriminator_parameter_count_equals_the_reference():
    with torch.device("meta"):
        theirs = reference_discriminator(64)
        ours = ShapeDiscriminator3d(1, 1, 64)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 11_020_290


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_discriminator_outputs_and_gradients_equal_the_reference(mode):
    torch.manual_seed(0)
    theirs = reference_discriminator().double()
    ours = ShapeDiscriminator3d(1, 1, NDF).double()
    ours.load_state_dict(discriminator_state(theirs.state_dict()))
    getattr(theirs, mode)(), getattr(ours, mode)()
    gen = torch.Generator().manual_seed(1)
    sdf = torch.tanh(torch.randn(2, 1, *PATCH, generator=gen, dtype=torch.float64))
    image = torch.randn(2, 1, *PATCH, generator=gen, dtype=torch.float64)
    outputs = []
    for net in (theirs, ours):
        torch.manual_seed(5)  # the same Dropout3d masks, drawn in the same order
        out = net(sdf, image)
        F.cross_entropy(out, torch.tensor([1, 0])).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
    ours_grads = dict(ours.named_parameters())
    for name, grad in discriminator_state({k: p.grad for k, p in theirs.named_parameters()}).items():
        torch.testing.assert_close(ours_grads[name].grad, grad, rtol=1e-9, atol=1e-12)


def reference_parts():
    vnet_sdf, losses, util, ramps = reference_modules(
        REPO, "networks.vnet_sdf", "utils.losses", "utils.util", "utils.ramps")
    return vnet_sdf, losses, util, ramps


def method_and_reference(seed: int = 0):
    """Our sassnet (tiny widths) and the reference net + discriminator holding the same weights."""
    pytest.importorskip("skimage")  # the reference's compute_sdf needs it
    vnet_sdf, losses, util, ramps = reference_parts()
    cls = get_method("sassnet")
    torch.manual_seed(seed)
    method = cls(SPECS["la"], cls.hparams_for("la", {"discriminator_width": NDF}),
                 {"n_filters": N_FILTERS}, 6000).train()
    net = vnet_sdf.VNet(n_channels=1, n_classes=1, n_filters=N_FILTERS,
                        normalization="batchnorm", has_dropout=True)
    discriminator = reference_discriminator()
    # Ours holds the reference's random init (mapped), so both start from the same weights.
    method.student.load_state_dict(vnet_state(net.state_dict()))
    method.discriminator.load_state_dict(discriminator_state(discriminator.state_dict()))
    return method, net.train(), discriminator, losses, util, ramps


def make_batch(seed: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """Two labeled and two unlabeled crops (train:34-35) whose labels hold a blob each."""
    gen = torch.Generator().manual_seed(seed)
    volume = torch.randn(4, 1, *PATCH, generator=gen)
    label = torch.zeros(4, *PATCH, dtype=torch.long)
    label[0, 30:70, 40:80, 20:50] = 1
    label[1, 50:100, 10:60, 30:70] = 1
    return Batch(volume[:2], label[:2], volume[2:]), volume, label


def reference_net_loss(net, discriminator, losses, util, ramps, volume, label, iter_num):
    """train:153-176, with its own functions and constants (beta 0.3, consistency 0.01/40)."""
    labeled_bs = 2
    dtarget = torch.tensor([1, 1, 0, 0])
    net.train()
    discriminator.eval()
    outputs_tanh, outputs = net(volume)
    outputs_soft = torch.sigmoid(outputs)
    with torch.no_grad():
        gt_dis = util.compute_sdf(label[:].cpu().numpy(), outputs[:labeled_bs, 0, ...].shape)
        gt_dis = torch.from_numpy(gt_dis).float()
    loss_sdf = F.mse_loss(outputs_tanh[:labeled_bs, 0, ...], gt_dis)
    loss_seg_dice = losses.dice_loss(outputs_soft[:labeled_bs, 0, :, :, :], label[:labeled_bs] == 1)
    consistency_weight = 0.01 * ramps.sigmoid_rampup(iter_num // 150, 40.0)
    supervised_loss = loss_seg_dice + 0.3 * loss_sdf
    d_outputs = discriminator(outputs_tanh[labeled_bs:], volume[labeled_bs:])
    loss_adv = F.cross_entropy(d_outputs, dtarget[:labeled_bs].long())
    return supervised_loss + consistency_weight * loss_adv


@pytest.mark.parametrize("iter_num", [0, 5999])
def test_the_net_loss_and_its_gradients_equal_the_reference(iter_num):
    method, net, discriminator, losses, util, ramps = method_and_reference()
    batch, volume, label = make_batch(2)
    torch.manual_seed(7)
    theirs = reference_net_loss(net, discriminator, losses, util, ramps, volume, label, iter_num)
    theirs.backward()
    torch.manual_seed(7)  # the same dropout masks in the net
    ours, logs = method.train_step(batch, iter_num)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert logs["cons_weight"] == pytest.approx(0.01 * ramps.sigmoid_rampup(iter_num // 150, 40))
    ours_grads = dict(method.student.named_parameters())
    for name, grad in vnet_state({k: p.grad for k, p in net.named_parameters()}).items():
        torch.testing.assert_close(ours_grads[name].grad, grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in method.discriminator.parameters())


def test_two_whole_iterations_equal_the_reference_loop(monkeypatch):
    """The script imported as a module (its args, compute_sdf, losses, consistency ramp) and its
    loop body (train:150-202, from reading the batch to the discriminator's Adam step) executed
    twice, against two iterations of the engine's Updater with our method."""
    from tests.reference_code import import_script, script_lines

    method, net, discriminator, *_ = method_and_reference()
    module = import_script(monkeypatch, REPO, "train_gan_sdfloss",
                           stubs=("tensorboardX", "torchvision", "torchvision.transforms",
                                  "torchvision.utils"))
    body = script_lines(REPO, "train_gan_sdfloss",
                        "volume_batch, label_batch = sampled_batch['image']", "Dopt.step()")
    # train:124-125, the reference's two optimisers, their constants read from its text
    script = script_optimisers()
    optimizer = torch.optim.SGD(net.parameters(), lr=script["base_lr"],
                                momentum=script["momentum"], weight_decay=script["weight_decay"])
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=script["d_lr"], betas=script["betas"])
    update = Updater(method, main_optimizer(method, {"lr": 0.01, "momentum": 0.9,
                                                     "weight_decay": 1e-4}),
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                     amp_dtype=None, nonfinite="stop", max_consecutive_skips=1, where="test",
                     auxiliary=auxiliary_optimizers(method))
    state = TrainingState()
    schedule = {"lr": 0.01, "schedule": "step", "step_size": 2500, "gamma": 0.1}
    for iter_num in range(2):
        batch, volume, label = make_batch(10 + iter_num)
        namespace = {**vars(module), "model": net, "D": discriminator, "optimizer": optimizer,
                     "Dopt": d_opt, "iter_num": iter_num, "ce_loss": torch.nn.BCEWithLogitsLoss(),
                     "mse_loss": torch.nn.MSELoss(),
                     "sampled_batch": {"image": volume, "label": label}}
        torch.manual_seed(100 + iter_num)
        exec(body, namespace)  # noqa: S102 (the reference's own loop lines, pinned snapshot)

        torch.manual_seed(100 + iter_num)  # the same dropout masks, drawn in the same order
        _, ours, logs, skipped = update(method, batch, schedule, iter_num, 6000, state)
        assert not skipped
        torch.testing.assert_close(ours, namespace["loss"].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logs["loss_discriminator"], namespace["D_loss"].detach(),
                                   rtol=1e-5, atol=1e-6)
    for ours_state, theirs_state in ((method.student.state_dict(), vnet_state(net.state_dict())),
                                     (method.discriminator.state_dict(),
                                      discriminator_state(discriminator.state_dict()))):
        for name, value in theirs_state.items():
            torch.testing.assert_close(ours_state[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert method.student.training  # back in train mode for the next step


def script_optimisers() -> dict:
    """The constants of the reference's two optimisers, read from train_gan_sdfloss.py's text
    (train:36-37 argparse defaults, train:124-125 the optimisers)."""
    import re

    from tests.reference_code import reference_source

    text = reference_source(REPO, "train_gan_sdfloss.py")

    def default(name):
        return float(re.search(rf"'--{name}', type=float,\s*default=([0-9.e-]+)", text).group(1))

    adam = re.search(r"Dopt = optim\.Adam\(D\.parameters\(\), lr=args\.D_lr, "
                     r"betas=\(([0-9.]+),\s*([0-9.]+)\)\)", text)
    sgd = re.search(r"optimizer = optim\.SGD\(model\.parameters\(\), lr=base_lr, "
                    r"momentum=([0-9.]+), weight_decay=([0-9.e-]+)\)", text)
    return {"d_lr": default("D_lr"), "betas": (float(adam.group(1)), float(adam.group(2))),
            "base_lr": default("base_lr"), "momentum": float(sgd.group(1)),
            "weight_decay": float(sgd.group(2))}


def test_the_optimiser_constants_are_the_scripts():
    """Every optimiser constant SASSNet trains with equals the script's text, so a changed beta
    (0.99 -> 0.999: invisible in two Adam steps at float32 tolerances) fails here."""
    from agcl.config import load_config
    from tests.conftest import REPO_ROOT

    script = script_optimisers()
    method = method_and_reference()[0]
    (update,) = method.auxiliary_updates()
    assert (update.optimizer, update.lr, update.betas) == ("adam", script["d_lr"],
                                                           script["betas"])
    reference = load_config(REPO_ROOT / "config" / "reference.yaml")
    train = {**reference["datasets"]["la"]["train"],
             **reference["datasets"]["la"]["train_by_method"]["sassnet"]}
    assert (train["lr"], train["momentum"], train["weight_decay"]) == (
        script["base_lr"], script["momentum"], script["weight_decay"])


def test_many_adam_steps_of_the_discriminator_equal_the_reference_optimiser():
    """Ten Adam steps of the discriminator through the engine's auxiliary update against
    torch.optim.Adam with the script's constants, float64 on varying gradients: beta2 shows
    from the second step on (its bias correction), so 0.999 for 0.99 fails at these tolerances."""
    from agcl.engine.optimizers import auxiliary_optimizers

    script = script_optimisers()
    method = method_and_reference()[0].double()
    params = list(method.discriminator.parameters())
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    reference = torch.optim.Adam(copies, lr=script["d_lr"], betas=script["betas"])
    (_, ours) = auxiliary_optimizers(method)["discriminator"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p, q in zip(params, copies):
            g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
