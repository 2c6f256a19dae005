"""MC-Net+ on ACDC against its reference code, ycwu1997/MC-Net code/train_mcnet_2d.py (cited
script:N): the script imported as a module (argparse at its defaults, plus the flags its own
train_mcnet_2d.sh trains the three-decoder net with: --model mcnet2d_v2 --labelnum 14
--temperature 0.1), its setup lines (script:71-74, 76, 99-102: base_lr, labeled_bs, the net from
its net_factory, the SGD, CE, MSE and DiceLoss) and the body of its training loop (script:112-147,
from reading the batch to the optimiser step; the script never changes the lr) read from its text
and executed on the same tensors as our method's train_step and the engine's optimiser. Its
MCNet2d_v2 (decoder1 bilinear, decoder2 ConvTranspose, decoder3 nearest: networks/unet.py:167-199)
is mapped into our "mcnet2d", decoder d onto our decoders[d - 1].

Two consecutive steps (momentum and weight decay show), each at the script's batch (24, 12
labeled), on 32x32 slices, from 0-based steps 0 (ramp at its start), 149 (the ramp's epoch turns
at the script's increment: iter_num 150), 15000 (mid-ramp) and 29999 (iter_num 30000: the ramp's
end, weight = consistency). Compared: the loss, the Dice and mutual-consistency terms, the ramp
weight, every gradient (through the sharpened targets too: the script's index assignment keeps
them in the graph), the weights and BatchNorm statistics after each step.

Bridged, not changed: `.cuda()` is the identity; tensorboardX, torchvision and the dataset module
are stubs (the loader and writer never run); `os.environ['CUDA_VISIBLE_DEVICES']` (script:75) is
not executed.
"""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from torch import nn

from agcl.config import load_config
from agcl.config.recipe import resolve_recipe
from agcl.data.specs import SPECS
from agcl.engine.optimizers import main_optimizer
from agcl.engine.update import learning_rate
from agcl.methods import Batch
from agcl.methods.registry import get_method
from agcl.nets.mcnet import MCNET2D_V2_MODES
from tests.conftest import REPO_ROOT
from tests.reference_code import (
    assert_close_by_name,
    import_script,
    reference_source,
    reference_text,
    script_lines,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO, SCRIPT = "ycwu1997/MC-Net", "train_mcnet_2d"
STUBS = ("tensorboardX", "dataloaders.dataset", "torchvision", "torchvision.transforms",
         "torchvision.utils")
SIZE = (32, 32)  # four 2x poolings down to 2x2: small enough for CPU seconds
CLOSE = {"rtol": 1e-5, "atol": 1e-7}
# MC-Net's UpBlock mode_upsampling (networks/unet.py:45-54) -> our up_layer modes
UP_TYPES = {0: "deconv", 1: "bilinear", 2: "nearest", 3: "bicubic"}


def sh_flags() -> list[str]:
    """The flags of the first line of train_mcnet_2d.sh that trains MCNet2d_v2."""
    for line in reference_text(REPO, "train_mcnet_2d.sh").splitlines():
        if "train_mcnet_2d.py" in line and "mcnet2d_v2" in line:
            words = shlex.split(line.replace("&&", "").rstrip(" \\"))
            return words[words.index("./code/train_mcnet_2d.py") + 1:]
    raise AssertionError("train_mcnet_2d.sh trains no mcnet2d_v2")


@pytest.fixture
def script(monkeypatch):
    module, unet = import_script(monkeypatch, REPO, SCRIPT, "networks.unet", stubs=STUBS)
    flags = sh_flags()
    assert flags[flags.index("--model") + 1] == "mcnet2d_v2"
    module.args = module.parser.parse_args(flags)  # argparse: its defaults and the .sh's flags
    return module, unet


def reference_recipe():
    return resolve_recipe(load_config(REPO_ROOT / "config" / "reference.yaml"), "acdc", "mc_net")


def ours_named(state: dict) -> dict:
    """MCNet2d_v2 names (networks/unet.py) -> our mcnet2d's."""
    rules = [
        (r"encoder\.in_conv\.conv_conv\.", "encoder.blocks.0."),
        (r"encoder\.down(\d)\.maxpool_conv\.1\.conv_conv\.", r"encoder.blocks.\1."),
        (r"decoder(\d)\.up(\d)\.(?:conv1x1|up)\.",
         lambda m: f"decoders.{int(m[1]) - 1}.ups.{int(m[2]) - 1}.0."),
        (r"decoder(\d)\.up(\d)\.conv\.conv_conv\.",
         lambda m: f"decoders.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}."),
        (r"decoder(\d)\.out_conv\.", lambda m: f"decoders.{int(m[1]) - 1}.out_conv."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            mapped, n = re.subn("^" + pattern, replacement, key)
            if n:
                out[mapped] = value
                break
        else:
            raise KeyError(key)
    return out


def setup_lines() -> str:
    """script:71-74 (base_lr, labeled_bs, num_classes, max_iterations), script:76 (the net),
    script:99-102 (optimiser, CE, MSE, DiceLoss), as the script runs them in train()."""
    after = "def train(args, snapshot_path):"
    return "\n".join([
        script_lines(REPO, SCRIPT, "base_lr = args.base_lr", "max_iterations = args.max_iterations",
                     after=after),
        script_lines(REPO, SCRIPT, "model = net_factory(", "class_num=num_classes)", after=after),
        script_lines(REPO, SCRIPT, "optimizer = optim.SGD(", "losses.DiceLoss(n_classes=num_classes)",
                     after=after)])


def loop_body() -> str:
    return script_lines(REPO, SCRIPT, "volume_batch, label_batch = sampled_batch['image']",
                        "optimizer.step()")


@pytest.mark.parametrize("iter_num", [0, 149, 15000, 29999])
def test_two_steps_equal_the_scripts_loop(script, iter_num):
    module, _ = script
    args = module.args
    namespace = {**vars(module), "args": args}
    torch.manual_seed(0)
    exec(setup_lines(), namespace)  # noqa: S102 (the reference's own lines, pinned snapshot)
    model, optimizer = namespace["model"], namespace["optimizer"]
    assert type(model).__name__ == "MCNet2d_v2"
    labeled_bs, batch_size = namespace["labeled_bs"], args.batch_size

    recipe = reference_recipe()
    assert (recipe.train_cfg["batch_size"], recipe.train_cfg["labeled_batch_size"]) == (
        batch_size, labeled_bs)
    (stage,) = recipe.stages
    cls = get_method("mc_net")
    method = cls(SPECS["acdc"], cls.hparams_for("acdc", {}), {}, stage.iterations)
    assert method.net_name(SPECS["acdc"]) == "mcnet2d"
    method.student.load_state_dict(ours_named(model.state_dict()))
    model.train(), method.train()
    ours_optimizer = main_optimizer(method, recipe.train_cfg)
    set_to_none = recipe.train_cfg["grad_reset"] == "none"

    gen = torch.Generator().manual_seed(iter_num)
    namespace["iter_num"] = iter_num
    for step in (iter_num, iter_num + 1):
        volume_batch = torch.randn(batch_size, 1, *SIZE, generator=gen)
        label_batch = torch.randint(0, args.num_classes, (batch_size, *SIZE), generator=gen)
        assert namespace["iter_num"] == step  # the script's counter, carried between steps
        namespace["sampled_batch"] = {"image": volume_batch, "label": label_batch}
        torch.manual_seed(7)  # the encoder's dropout masks, drawn in the same order
        exec(loop_body(), namespace)  # noqa: S102 (the reference's own loop lines, pinned)

        torch.manual_seed(7)
        loss, logs = method.train_step(Batch(volume_batch[:labeled_bs], label_batch[:labeled_bs],
                                             volume_batch[labeled_bs:]), step)
        torch.testing.assert_close(loss, namespace["loss"], **CLOSE)
        torch.testing.assert_close(logs["loss_dice"], namespace["loss_seg_dice"], **CLOSE)
        torch.testing.assert_close(logs["loss_mc"], namespace["loss_consist"], **CLOSE)
        assert logs["cons_weight"] == pytest.approx(namespace["consistency_weight"], rel=1e-15)
        assert logs["cons_weight"] > 0 and float(logs["loss_mc"]) > 0

        for group in ours_optimizer.param_groups:  # the lr the script trained this step with
            group["lr"] = learning_rate(stage.schedule, step, stage.iterations)
            assert group["lr"] == optimizer.param_groups[0]["lr"]
        ours_optimizer.zero_grad(set_to_none=set_to_none)
        loss.backward()
        assert_close_by_name({n: p.grad for n, p in method.student.named_parameters()},
                             ours_named({n: p.grad for n, p in model.named_parameters()}), "grad")
        ours_optimizer.step()
        method.after_optimizer_step(step)
        assert_close_by_name(method.student.state_dict(), ours_named(model.state_dict()),
                             "weights")
        # Equal to float32 rounding is not bit-equal, and the next step's gradients move by 1-5 %
        # (the ConvTranspose decoder most) for weights 1e-6 apart under the AVX2 kernels (ours
        # against ours, from either side's weights; no max-pool index flips): the next step starts
        # from the reference's weights (in place: our optimiser's momentum buffers stay ours).
        method.student.load_state_dict(ours_named(model.state_dict()))
    if iter_num == 15000:
        assert 0.01 < namespace["consistency_weight"] < args.consistency
    if iter_num == 29999:
        assert namespace["consistency_weight"] == args.consistency


def test_the_decoders_are_the_references_in_its_order(script):
    """MCNet2d_v2's decoders d = 1, 2, 3 (up_type 1, 0, 2) are our decoders[d - 1], and the
    first one is what inference uses (test_2d.py:47-49 and val_2d.py:29-31 read output[0])."""
    _, unet = script
    text = reference_source(REPO, "networks/unet.py")
    body = text[text.index("class MCNet2d_v2"):text.index("class MCNet2d_v3")]
    up_types = [int(t) for t in re.findall(r"'up_type': (\d)", body)]
    assert tuple(UP_TYPES[t] for t in up_types) == MCNET2D_V2_MODES
    assert "self.decoder1 = Decoder(params1)" in body and "output1, output2, output3" in body
    net = get_method("mc_net")(SPECS["acdc"], get_method("mc_net").hparams_for("acdc", {}), {},
                               10).student
    for decoder, mode in zip(net.decoders, MCNET2D_V2_MODES, strict=True):
        up = decoder.ups[0]
        if mode == "deconv":
            assert isinstance(up[0], nn.ConvTranspose2d)
        else:
            assert isinstance(up[1], nn.Upsample) and up[1].mode == mode
    with torch.device("meta"):
        reference = unet.MCNet2d_v2(in_chns=1, class_num=4)
    assert sum(p.numel() for p in reference.parameters()) == sum(
        p.numel() for p in net.parameters()) == 3_210_924
    test_text = reference_source(REPO, "test_2d.py")
    assert re.search(r"out_main = net\(input\)\s+if len\(out_main\)>1:\s+out_main=out_main\[0\]",
                     test_text)


def test_the_hyperparameters_are_the_scripts(script):
    """Every constant our mc_net trains ACDC with, read from the script's argparse and text."""
    module, _ = script
    args = module.args
    text = reference_source(REPO, f"{SCRIPT}.py")
    losses_text = reference_source(REPO, "utils/losses.py")
    hparams = get_method("mc_net").hparams_for("acdc", {})
    assert (hparams["temperature"], hparams["consistency"], hparams["consistency_rampup"],
            hparams["dice_weight"]) == (args.temperature, args.consistency,
                                        args.consistency_rampup, args.lamda)
    # the sharpening and the loss
    assert "T = 1/args.temperature\n    P_sharpen = P ** T / (P ** T + (1-P) ** T)" in text
    assert "loss = args.lamda * loss_seg_dice + consistency_weight * loss_consist" in text
    assert "consistency_criterion = losses.mse_loss" in text
    assert "return torch.mean((input1 - input2)**2)" in losses_text
    # the ramp: on iter_num after its increment, in 150-iteration epochs
    assert re.search(r"iter_num = iter_num \+ 1\s+consistency_weight = "
                     r"get_current_consistency_weight\(iter_num//150\)", text)
    assert hparams["rampup_epoch_iterations"] == 150
    assert "return args.consistency * ramps.sigmoid_rampup(epoch, args.consistency_rampup)" in text
    # the Dice: DiceLoss(n_classes) on softmax probabilities, every class, no factor 2
    assert "dice_loss = losses.DiceLoss(n_classes=num_classes)" in text
    assert "loss_seg_dice += dice_loss(y_prob, label_batch[:labeled_bs].unsqueeze(1))" in text
    assert "loss = 1 - intersection / union" in losses_text
    assert "for i in range(0, self.n_classes):" in losses_text
    assert hparams["dice_form"] == "mcnet2d" and hparams["dice_include_background"]
    # the CE term is computed and never added (MC-Net #4)
    assert "loss_seg += ce_loss(" in text and "loss_seg_dice + consistency_weight" in text
    # the sharpened targets stay in the graph (index assignment into a fresh tensor)
    assert "y_pseudo_label[idx] = sharpening(y_prob_all)" in text
    assert not hparams["detach_targets"]
    # the recipe: SGD 0.01, momentum 0.9, weight decay 1e-4, lr never changed, batch 24 (12),
    # 30000 iterations
    train = reference_recipe().train_cfg
    assert "optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0001)" in text
    assert (train["lr"], train["momentum"], train["weight_decay"]) == (args.base_lr, 0.9, 0.0001)
    assert "param_group['lr']" not in text and "lr_" not in text
    assert train["schedule"] == "constant"
    assert (train["batch_size"], train["labeled_batch_size"], train["iterations"]) == (
        args.batch_size, args.labeled_bs, args.max_iterations)
    assert args.num_classes == SPECS["acdc"].num_classes
