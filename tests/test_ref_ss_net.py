"""ss_net against SS-Net's own code (ycwu1997/SS-Net, code/, the commit pinned in reference_code).

Nets: SS-Net's VNet (normalization='batchnorm', has_dropout=True, as net_factory.py:8 trains it)
and UNet, their state dicts mapped onto "ssnet3d" / "unet" plus SSNetHeads: same logits and
embedding in train mode (same dropout masks) and eval mode, same parameter counts at real width.
Loss pieces on fixed tensors, values and gradients: Binary_dice_loss, DiceLoss, softDiceLoss,
_l2_normalize, VAT3d / VAT2d (the start direction injected into both), the memory update
(FeatureMemory) and contrastive_class_to_class_learned_memory. The step: one train_step of ours
against train_ss_3d.py:108-177 / train_ss_2d.py:111-166 assembled from the reference's functions
on the same batch, dropout masks and VAT draw: loss, every logged term, the gradient of every
parameter, the memory and every BatchNorm running statistic after it.
Everything runs in float64 on the CPU; SS-Net's .cuda() calls are made no-ops.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from agcl.data.specs import SPECS
from agcl.methods.dice import dice_batch_squared
from agcl.methods.registry import get_method
from agcl.nets import build
from agcl.nets.ssnet import SSNetHeads
from tests.reference_code import reference_modules

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "ycwu1997/SS-Net"
F64 = torch.float64
# 3D: SS-Net's VNet at width 4 (its heads' dim_in = 16 is resized to 4, see reference_net);
# 2D: SS-Net's UNet has fixed widths 16..256, so it runs at real width on 32x32 slices.
CASES = {"la": ((4, 1, 16, 16, 16), 2, {"n_filters": 4}),
         "acdc": ((4, 1, 32, 32), 4, {"base_features": 16})}
N_LABELED = 2
EXACT = {"rtol": 0.0, "atol": 1e-12}
CLOSE = {"rtol": 1e-10, "atol": 1e-13}  # room for reductions summed in another order


@pytest.fixture(autouse=True)
def cuda_is_a_no_op(monkeypatch):
    """contrastive_losses.py:36 moves the memory with .cuda(); here everything stays on the CPU."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def ref(*names):
    return reference_modules(REPO, *names)


# ---------------------------------------------------------------------------------------------
# State-dict mapping: ours (student + heads) -> SS-Net's module names


_VNET_ENCODER = ["block_one", "block_two", "block_three", "block_four", "block_five"]
_VNET_DECODER_UPS = ["block_five_up", "block_six_up", "block_seven_up", "block_eight_up"]
_VNET_DECODER = ["block_six", "block_seven", "block_eight", "block_nine"]


def reference_key(key: str, dims: int) -> str:
    """Our parameter / buffer name -> SS-Net's (VNet.py, unet.py)."""
    rules = [
        (r"heads\.projection\.", "projection_head."),
        (r"heads\.prediction\.", "prediction_head."),
        (r"heads\.selectors\.(\d+)\.", r"contrastive_class_selector_\1."),
        (r"heads\.memory_selectors\.(\d+)\.", r"contrastive_class_selector_memory\1."),
        (r"student\.decoders\.0\.out_conv\.", "decoder.out_conv."),
    ]
    if dims == 3:
        rules += [
            (r"student\.encoder\.stages\.(\d)\.", lambda m: f"encoder.{_VNET_ENCODER[int(m[1])]}.conv."),
            (r"student\.encoder\.downs\.(\d)\.", lambda m: f"encoder.{_VNET_ENCODER[int(m[1])]}_dw.conv."),
            (r"student\.decoders\.0\.ups\.(\d)\.", lambda m: f"decoder.{_VNET_DECODER_UPS[int(m[1])]}.conv."),
            (r"student\.decoders\.0\.stages\.(\d)\.", lambda m: f"decoder.{_VNET_DECODER[int(m[1])]}.conv."),
        ]
    else:
        rules += [
            (r"student\.encoder\.blocks\.0\.", "encoder.in_conv.conv_conv."),
            (r"student\.encoder\.blocks\.(\d)\.", r"encoder.down\1.maxpool_conv.1.conv_conv."),
            (r"student\.decoders\.0\.ups\.(\d)\.0\.", lambda m: f"decoder.up{int(m[1]) + 1}.conv1x1."),
            (r"student\.decoders\.0\.blocks\.(\d)\.", lambda m: f"decoder.up{int(m[1]) + 1}.conv.conv_conv."),
        ]
    for pattern, replacement in rules:
        mapped, n = re.subn("^" + pattern, replacement, key)
        if n:
            return mapped
    raise KeyError(key)


def unet_renamer(our_names):
    """A state dict of the SSL4MIS-style 2D U-Net (SSL4MIS, UniMatch, BCP's and ABD's UNet_2d) ->
    our net's names (their extra heads, which our net lacks, dropped)."""
    theirs = {reference_key(f"student.{name}", 2): name for name in our_names}
    return lambda state: {theirs[key]: value for key, value in state.items() if key in theirs}


class Ours(nn.Module):
    """Student and heads under the names the method gives them."""

    def __init__(self, dataset: str):
        super().__init__()
        _, num_classes, net_kwargs = CASES[dataset]
        spec = SPECS[dataset]
        self.student = build(get_method("ss_net").net_name(spec), 1, num_classes, **net_kwargs)
        self.heads = SSNetHeads(self.student.feature_channels, num_classes)


def reference_net(dataset: str) -> nn.Module:
    _, num_classes, net_kwargs = CASES[dataset]
    if dataset == "la":
        vnet = ref("networks.VNet")
        net = vnet.VNet(n_channels=1, n_classes=num_classes, normalization="batchnorm",
                        has_dropout=True, **net_kwargs)
        # VNet.py:245 fixes dim_in = 16 (its real width); at test width the embedding has 4.
        net.projection_head[0] = nn.Linear(net_kwargs["n_filters"], 32)
        return net
    return ref("networks.unet").UNet(in_chns=1, class_num=num_classes)


def load_reference_into(ours: nn.Module, theirs: nn.Module, dims: int) -> None:
    state = theirs.state_dict()
    mapped = {key: state[reference_key(key, dims)] for key in ours.state_dict()}
    assert len(mapped) == len(state)  # every reference tensor has exactly one of ours
    ours.load_state_dict(mapped)


def perturb_batchnorm(net: nn.Module, seed: int) -> None:
    """BatchNorm starts at weight 1, bias 0, mean 0, var 1: perturb it so a swapped mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for t in (module.weight, module.bias, module.running_mean):
                    t.add_(0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen,
                                                    dtype=F64) + 0.5)


def net_pair(dataset: str):
    """(theirs, ours) in float64, ours holding the reference's (perturbed) random init."""
    torch.manual_seed(0)
    theirs = reference_net(dataset).double()
    perturb_batchnorm(theirs, 1)
    ours = Ours(dataset).double()
    load_reference_into(ours, theirs, len(CASES[dataset][0]) - 2)
    return theirs, ours


def batch_images(dataset: str, seed: int = 2) -> torch.Tensor:
    return torch.randn(CASES[dataset][0], generator=torch.Generator().manual_seed(seed), dtype=F64)


def mapped_grads(ours: nn.Module, theirs: nn.Module, dims: int, prefix: str = ""):
    """(our name, our gradient, the reference's gradient) of every parameter of ours."""
    ref_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters(prefix=prefix.rstrip(".")):
        yield name, p.grad, ref_params[reference_key(name, dims)].grad


def assert_states_equal(ours: nn.Module, theirs: nn.Module, dims: int, prefix: str) -> None:
    """Every parameter and buffer (BatchNorm running statistics, counters) of ours equal."""
    ref_state = theirs.state_dict()
    for name, t in ours.state_dict(prefix=prefix).items():
        torch.testing.assert_close(t, ref_state[reference_key(name, dims)], **EXACT, msg=name)


# ---------------------------------------------------------------------------------------------
# Nets


def test_parameter_counts_at_real_width_equal_the_reference():
    vnet, unet = ref("networks.VNet", "networks.unet")
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())
    with torch.device("meta"):
        ref_3d = vnet.VNet(n_channels=1, n_classes=2, normalization="batchnorm", has_dropout=True)
        ref_2d = unet.UNet(in_chns=1, class_num=4)
        ours_3d, heads_3d = build("ssnet3d", 1, 2), SSNetHeads(16, 2)
        ours_2d, heads_2d = build("unet", 1, 4), SSNetHeads(16, 4)
    assert count(ours_3d) == count(ref_3d.encoder, ref_3d.decoder) == 9_448_866
    assert count(ours_3d, heads_3d) == count(ref_3d) == 9_457_318
    assert count(ours_2d) == count(ref_2d.encoder, ref_2d.decoder) == 1_813_764
    assert count(ours_2d, heads_2d) == count(ref_2d) == 1_826_828


def test_ssnet3d_is_vnet_but_for_the_features_it_returns():
    torch.manual_seed(0)
    ssnet, vnet = build("ssnet3d", 1, 2, n_filters=4), build("vnet", 1, 2, n_filters=4)
    vnet.load_state_dict(ssnet.state_dict())
    x = batch_images("la")
    for mode in ("train", "eval"):
        ssnet.train(mode == "train")
        vnet.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(5)
            logits, embedding = ssnet.double().forward_features(x)
            torch.manual_seed(5)
            vnet_logits, vnet_features = vnet.double().forward_features(x)
        assert torch.equal(logits, vnet_logits)
        # train mode: half the channels of each sample zeroed, the rest doubled
        assert torch.equal(embedding, vnet_features) == (mode == "eval")


@pytest.mark.parametrize("dataset", sorted(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_embedding_and_gradients_equal_the_reference(dataset, mode):
    theirs, ours = net_pair(dataset)
    theirs.train(mode == "train")
    ours.train(mode == "train")
    x = batch_images(dataset)
    torch.manual_seed(7)  # the same dropout masks: both draw in the same order, same shapes
    ref_logits, ref_embedding = theirs(x)
    torch.manual_seed(7)
    logits, embedding = ours.student.forward_features(x)
    torch.testing.assert_close(logits, ref_logits, **EXACT)
    torch.testing.assert_close(embedding, ref_embedding, **EXACT)  # 3D: after the Dropout3d
    weights = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    ((ref_logits**2).sum() + (ref_embedding * weights).sum()).backward()
    ((logits**2).sum() + (embedding * weights).sum()).backward()
    for name, grad, ref_grad in mapped_grads(ours.student, theirs, x.ndim - 2, "student."):
        torch.testing.assert_close(grad, ref_grad, **CLOSE, msg=name)
    assert_states_equal(ours.student, theirs, x.ndim - 2, "student.")  # running statistics


# ---------------------------------------------------------------------------------------------
# Loss pieces


def ss_net_module():
    return get_method("ss_net")


def plugin():
    import sys

    return sys.modules[ss_net_module().__module__]


def probabilities(shape, seed):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.softmax(logits, dim=1).requires_grad_(True)


def test_dice_losses_equal_the_reference_values_and_gradients():
    losses = ref("utils.losses")
    ours = plugin()
    gen = torch.Generator().manual_seed(4)
    # 3D supervised: Binary_dice_loss(y[:, 1], y_true == 1) (train_ss_3d.py:159)
    p = probabilities((2, 2, 8, 8, 4), 5)
    labels = torch.randint(0, 2, (2, 8, 8, 4), generator=gen)
    expected = losses.Binary_dice_loss(p[:, 1], labels == 1)
    (ref_grad,) = torch.autograd.grad(expected, p)
    value = ours.supervised_dice(p, labels, "linear")
    (grad,) = torch.autograd.grad(value, p)
    torch.testing.assert_close(value, expected, **EXACT)
    torch.testing.assert_close(grad, ref_grad, **EXACT)
    # 2D supervised: DiceLoss(4)(y, y_true.unsqueeze(1)) (train_ss_2d.py:161)
    p = probabilities((3, 4, 16, 16), 6)
    labels = torch.randint(0, 4, (3, 16, 16), generator=gen)
    expected = losses.DiceLoss(4)(p, labels.unsqueeze(1))
    (ref_grad,) = torch.autograd.grad(expected, p)
    value = ours.supervised_dice(p, labels, "batch_squared")
    (grad,) = torch.autograd.grad(value, p)
    torch.testing.assert_close(value, expected, **CLOSE)
    torch.testing.assert_close(grad, ref_grad, **CLOSE)
    torch.testing.assert_close(dice_batch_squared(p, labels), expected, **CLOSE)
    # VAT distances on soft targets: VAT3d's Binary_dice_loss, VAT2d's softDiceLoss(4)
    for form, shape, ref_fn in [("linear", (2, 2, 8, 8, 4), losses.Binary_dice_loss),
                                ("batch_squared", (3, 4, 16, 16), losses.softDiceLoss(4))]:
        p, target = probabilities(shape, 7), probabilities(shape, 8).detach()
        expected = ref_fn(p, target)
        (ref_grad,) = torch.autograd.grad(expected, p)
        value = ours.vat_distance(p, target, form)
        (grad,) = torch.autograd.grad(value, p)
        torch.testing.assert_close(value, expected, **EXACT)
        torch.testing.assert_close(grad, ref_grad, **EXACT)


@pytest.mark.parametrize("shape", [(3, 1, 8, 8, 4), (3, 1, 16, 16)])
def test_unit_direction_equals_l2_normalize(shape):
    losses = ref("utils.losses")
    d = torch.rand(shape, generator=torch.Generator().manual_seed(9), dtype=F64) - 0.5
    torch.testing.assert_close(plugin().unit_per_sample(d), losses._l2_normalize(d.clone()),
                               **EXACT)


class TorchDrawing:
    """torch, except that torch.rand returns a given draw (SS-Net's VAT start direction)."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def rand(self, shape):
        assert tuple(shape) == self.noise.shape
        return self.noise.clone()

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_lds_equals_vat_value_gradients_and_running_statistics(dataset, monkeypatch):
    losses = ref("utils.losses")
    theirs, ours = net_pair(dataset)
    theirs.train()
    ours.train()
    x = batch_images(dataset)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    # losses.py:105,138 draw torch.rand(x.shape) from the global generator: inject the same draw
    # (and draw nothing globally, so that both sides' dropout masks stay aligned).
    monkeypatch.setattr(losses, "torch", TorchDrawing(noise))
    magnitude, vat = (10.0, losses.VAT3d) if dataset == "la" else (6.0, losses.VAT2d)
    torch.manual_seed(11)
    expected = vat(epi=magnitude)(theirs, x)
    expected.backward()
    form = "linear" if dataset == "la" else "batch_squared"
    torch.manual_seed(11)
    value = plugin().lds_loss(ours.student, x, noise, 10.0, magnitude, 1, form)
    value.backward()
    torch.testing.assert_close(value, expected, **EXACT)
    for name, grad, ref_grad in mapped_grads(ours.student, theirs, x.ndim - 2, "student."):
        torch.testing.assert_close(grad, ref_grad, **CLOSE, msg=name)
    # one running-statistics update, by the clean pass; the perturbed passes leave them
    assert_states_equal(ours.student, theirs, x.ndim - 2, "student.")
    assert all(m.track_running_stats for m in ours.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("num_classes", [2, 4])
def test_memory_update_equals_feature_memory(num_classes):
    feature_memory = ref("utils.feature_memory")
    torch.manual_seed(0)
    heads = SSNetHeads(16, num_classes).double().train()
    perturb_batchnorm(heads, 12)
    method = _bare_method(num_classes, heads)
    gen = torch.Generator().manual_seed(13)
    # class 1: 50 vectors (the selector keeps 32), class 2: 5 (all kept), class 3: none at first
    sizes = {2: [0, 50], 4: [0, 50, 5, 0]}[num_classes]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    features = torch.randn(len(labels), 16, generator=gen, dtype=F64)
    memory = feature_memory.FeatureMemory(elements_per_class=32, n_classes=num_classes)
    reference_model = _reference_model_from(copy.deepcopy(heads))
    for round_ in range(2):  # the second round: class 2 absent keeps its memory, class 3 arrives
        if round_ == 1:
            labels = torch.where(labels == 2, 3, labels)
            features = torch.randn(len(labels), 16, generator=gen, dtype=F64)
        with torch.no_grad():
            reference_model.eval()  # train_ss_3d.py:128-131
            projected = reference_model.projection_head(features)
            reference_model.train()
        memory.add_features_from_sample_learned(reference_model, projected, labels)
        method.update_memory(features, labels)
        counts = method.memory_count.tolist()
        for c in range(num_classes):
            if memory.memory[c] is None:
                assert counts[c] == 0
            else:
                assert counts[c] == len(memory.memory[c])
                np.testing.assert_array_equal(method.memory[c, :counts[c]].numpy(), memory.memory[c])
    assert counts == {2: [0, 32], 4: [0, 32, 5, 5]}[num_classes]
    before = method.memory.clone()
    method.update_memory(torch.zeros(0, 16, dtype=F64), torch.zeros(0, dtype=torch.long))
    assert torch.equal(method.memory, before) and method.memory_count.tolist() == counts
    for name, t in heads.state_dict().items():  # the selectors' running statistics moved alike
        torch.testing.assert_close(t, reference_model.state_dict()[reference_key("heads." + name, 3)],
                                   **EXACT)
    assert method.heads.training and method.heads.projection.training


def _reference_model_from(heads: SSNetHeads) -> nn.Module:
    """A module with SS-Net's head names (what its feature_memory / contrastive_losses read),
    sharing the parameters of `heads`."""
    model = nn.Module()
    model.projection_head = heads.projection
    model.prediction_head = heads.prediction
    for c, (selector, memory_selector) in enumerate(zip(heads.selectors, heads.memory_selectors)):
        setattr(model, f"contrastive_class_selector_{c}", selector)
        setattr(model, f"contrastive_class_selector_memory{c}", memory_selector)
    return model


def _bare_method(num_classes: int, heads: SSNetHeads):
    """An ss_net method whose heads are `heads` (memory in float64)."""
    dataset = "la" if num_classes == 2 else "acdc"
    cls = ss_net_module()
    method = cls(SPECS[dataset], cls.hparams_for(dataset), CASES[dataset][2], 1000).double()
    method.heads = heads
    return method


@pytest.mark.parametrize("num_classes", [2, 4])
def test_class_separation_equals_the_reference_value_and_gradients(num_classes):
    contrastive_losses = ref("utils.contrastive_losses")
    torch.manual_seed(0)
    heads = SSNetHeads(16, num_classes).double().train()
    perturb_batchnorm(heads, 14)
    reference_heads = copy.deepcopy(heads)
    gen = torch.Generator().manual_seed(15)
    # memory: class 0 none, class 1 20 rows, classes 2 / 3: one row (skipped), 7 rows
    memory_sizes = {2: [0, 20], 4: [0, 20, 1, 7]}[num_classes]
    memory_list = [None if n == 0 else torch.randn(n, 32, generator=gen, dtype=F64).numpy()
                   for n in memory_sizes]
    memory = torch.zeros(num_classes, 32, 32, dtype=F64)
    for c, rows in enumerate(memory_list):
        if rows is not None:
            memory[c, :len(rows)] = torch.from_numpy(rows)
    labels = torch.randint(0, num_classes, (300,), generator=gen)
    if num_classes == 4:
        labels[labels == 3] = 1
        labels[:1] = 3  # class 3: a single vector, skipped
    features = torch.randn(300, 32, generator=gen, dtype=F64, requires_grad=True)
    expected = contrastive_losses.contrastive_class_to_class_learned_memory(
        _reference_model_from(reference_heads), features, labels, num_classes, memory_list)
    (ref_grad,) = torch.autograd.grad(expected, features, retain_graph=True)
    expected.backward()
    value = plugin().class_separation_loss(heads, features, labels, memory, memory_sizes)
    (grad,) = torch.autograd.grad(value, features, retain_graph=True)
    value.backward()
    assert value.item() > 0
    torch.testing.assert_close(value, expected, **CLOSE)
    torch.testing.assert_close(grad, ref_grad, **CLOSE)
    reference_params = dict(reference_heads.named_parameters())
    for name, p in heads.named_parameters():
        ref_grad = reference_params[name].grad
        if ref_grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, ref_grad, **CLOSE, msg=name)
    for name, t in heads.state_dict().items():
        torch.testing.assert_close(t, reference_heads.state_dict()[name], **EXACT)


def test_consistency_weight_follows_each_script():
    ramps = ref("utils.ramps")
    cls = ss_net_module()
    for dataset, consistency, rampup, offset in [("la", 1.0, 40.0, 1), ("acdc", 0.1, 200.0, 0)]:
        hp = cls.hparams_for(dataset)
        assert (hp["consistency"], hp["consistency_rampup"], hp["rampup_iteration_offset"]) == (
            consistency, rampup, offset)
        from agcl.methods.ramps import epoch_rampup

        for step in [0, 148, 149, 150, 5000, 5999, 6000, 29999, 60000]:
            iter_num = step + offset
            expected = consistency * ramps.sigmoid_rampup(iter_num // 150, rampup)
            ours = hp["consistency"] * epoch_rampup(step + hp["rampup_iteration_offset"], 150,
                                                    hp["consistency_rampup"])
            assert ours == pytest.approx(expected, rel=1e-14, abs=0)


# ---------------------------------------------------------------------------------------------
# One training step


def reference_step(model, memory, x, labels, iter_num, dataset):
    """train_ss_3d.py:108-181 / train_ss_2d.py:111-170, from SS-Net's own functions: the loss
    and its terms; the parameters' gradients are left in `model`."""
    losses, ramps, contrastive_losses = ref("utils.losses", "utils.ramps",
                                            "utils.contrastive_losses")
    losses.torch = TorchDrawing(memory.vat_noise)  # the VAT draw (losses.py:105,138)
    functional = torch.nn.functional
    lb, num_classes = N_LABELED, CASES[dataset][1]
    channels_last = (0, 2, 3, 4, 1) if dataset == "la" else (0, 2, 3, 1)
    model.train()
    outputs, embedding = model(x)
    outputs_soft = functional.softmax(outputs, dim=1)
    labeled_features = embedding[:lb, ...]
    unlabeled_features = embedding[lb:, ...]
    y = outputs_soft[:lb]
    true_labels = labels
    _, prediction_label = torch.max(y, dim=1)
    _, pseudo_label = torch.max(outputs_soft[lb:], dim=1)
    mask_prediction_correctly = ((prediction_label == true_labels).float()
                                 * (prediction_label > 0).float()).bool()
    labeled_features = labeled_features.permute(*channels_last)
    labels_correct = true_labels[mask_prediction_correctly]
    labeled_features_correct = labeled_features[mask_prediction_correctly, ...]
    with torch.no_grad():
        model.eval()
        proj_labeled_features_correct = model.projection_head(labeled_features_correct)
        model.train()
    memory.add_features_from_sample_learned(model, proj_labeled_features_correct, labels_correct)
    labeled_features_all = labeled_features.reshape(-1, labeled_features.size()[-1])
    labeled_labels = true_labels.reshape(-1)
    pred_labeled = model.prediction_head(model.projection_head(labeled_features_all))
    loss_cl_l = contrastive_losses.contrastive_class_to_class_learned_memory(
        model, pred_labeled, labeled_labels, num_classes, memory.memory)
    unlabeled_features = unlabeled_features.permute(*channels_last).reshape(
        -1, labeled_features.size()[-1])
    pseudo_label = pseudo_label.reshape(-1)
    pred_unlabeled = model.prediction_head(model.projection_head(unlabeled_features))
    loss_cl_u = contrastive_losses.contrastive_class_to_class_learned_memory(
        model, pred_unlabeled, pseudo_label, num_classes, memory.memory)
    loss_ce = functional.cross_entropy(outputs[:lb], true_labels)
    if dataset == "la":
        loss_dice = losses.Binary_dice_loss(y[:, 1, ...], (true_labels == 1))
        loss_lds = losses.VAT3d(epi=10.0)(model, x)
        consistency, rampup = 1.0, 40.0
    else:
        loss_dice = losses.DiceLoss(n_classes=num_classes)(y, true_labels.unsqueeze(1))
        loss_lds = losses.VAT2d(epi=6.0)(model, x)
        consistency, rampup = 0.1, 200.0
    consistency_weight = consistency * ramps.sigmoid_rampup(iter_num // 150, rampup)
    loss = loss_dice + consistency_weight * (loss_lds + 0.1 * (loss_cl_l + loss_cl_u))
    model.zero_grad()
    loss.backward()
    return loss, {"loss_dice": loss_dice, "loss_ce": loss_ce, "loss_lds": loss_lds,
                  "loss_cl_l": loss_cl_l, "loss_cl_u": loss_cl_u,
                  "cons_weight": consistency_weight}


# (dataset, 0-based step of ours, the reference's iter_num at its ramp)
STEPS = [("la", 1499, 1500), ("acdc", 3000, 3000)]


@pytest.mark.parametrize(("dataset", "step", "iter_num"), STEPS)
def test_train_step_equals_the_reference_step(dataset, step, iter_num):
    feature_memory = ref("utils.feature_memory")
    shape, num_classes, net_kwargs = CASES[dataset]
    dims = len(shape) - 2
    torch.manual_seed(0)
    theirs = reference_net(dataset).double()
    perturb_batchnorm(theirs, 1)
    cls = ss_net_module()
    method = cls(SPECS[dataset], cls.hparams_for(dataset), net_kwargs, 100_000).double().train()
    state = theirs.state_dict()
    mapped = {k: state[reference_key(k, dims)] for k in method.state_dict()
              if k.startswith(("student.", "heads."))}
    assert len(mapped) == len(state)
    assert set(method.load_state_dict(mapped, strict=False).missing_keys) == {
        "memory", "memory_count"}
    x = batch_images(dataset)
    # Labels: the step's own predictions on 70% of the labeled voxels (so that the memory fills,
    # > 32 per class: the selector's sort), random elsewhere; the last class never predicted
    # correctly, so it keeps the memory of an earlier step.
    with torch.no_grad():
        torch.manual_seed(123)
        prediction = copy.deepcopy(theirs).train()(x)[0][:N_LABELED].argmax(1)
    gen = torch.Generator().manual_seed(16)
    labels = torch.where(torch.rand(prediction.shape, generator=gen) < 0.7, prediction,
                         torch.randint(0, num_classes, prediction.shape, generator=gen))
    last = num_classes - 1
    if num_classes > 2:
        labels[(prediction == last) & (labels == last)] = 0
    # an earlier step's memory, the same on both sides
    memory = feature_memory.FeatureMemory(elements_per_class=32, n_classes=num_classes)
    for c in range(1, num_classes):
        rows = torch.randn(10 + c, 32, generator=gen, dtype=F64)
        memory.memory[c] = rows.numpy().copy()
        method.memory[c, :len(rows)] = rows
        method.memory_count[c] = len(rows)
    # the VAT start direction ours will draw from its stream, handed to the reference
    stream = method.streams.torch("vat_noise", "cpu")
    saved = stream.get_state()
    memory.vat_noise = torch.rand(shape, generator=stream, dtype=F64)
    stream.set_state(saved)

    torch.manual_seed(123)  # the same dropout masks on both sides, drawn in the same order
    ref_loss, ref_logs = reference_step(theirs, memory, x, labels, iter_num, dataset)
    batch = get_batch(x, labels)
    torch.manual_seed(123)
    loss, logs = method.train_step(batch, step)
    method.zero_grad(set_to_none=True)
    loss.backward()

    torch.testing.assert_close(loss, ref_loss, **CLOSE)
    assert set(logs) == set(ref_logs)
    for key, value in ref_logs.items():
        torch.testing.assert_close(torch.as_tensor(logs[key], dtype=F64),
                                   torch.as_tensor(value, dtype=F64), **CLOSE, msg=key)
    assert 0 < logs["cons_weight"] < 1 and logs["loss_cl_l"] > 0 and logs["loss_cl_u"] > 0
    for name, grad, ref_grad in mapped_grads(method, theirs, dims):
        if ref_grad is None:  # the memory selectors of classes without a memory
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, ref_grad, **CLOSE, msg=name)
    # the memory: replaced where the step predicted a class correctly, kept elsewhere
    counts = method.memory_count.tolist()
    assert counts[0] == 0 and memory.memory[0] is None
    for c in range(1, num_classes):
        np.testing.assert_array_equal(method.memory[c, :counts[c]].numpy(), memory.memory[c])
    assert counts[1] == 32 and counts[last] == (10 + last if num_classes > 2 else 32)
    # every running statistic: net (main and clean VAT passes), heads (every train-mode call)
    for prefix, module in [("student.", method.student), ("heads.", method.heads)]:
        assert_states_equal(module, theirs, dims, prefix)


def get_batch(x: torch.Tensor, labels: torch.Tensor):
    from agcl.methods import Batch

    return Batch(x[:N_LABELED], labels, x[N_LABELED:])


def test_binary_dice_needs_two_classes():
    cls = ss_net_module()
    assert cls.check_recipe(cls.hparams_for("la"), {}, SPECS["la"]) == []
    assert cls.check_recipe(cls.hparams_for("acdc"), {}, SPECS["acdc"]) == []
    problems = cls.check_recipe(cls.hparams_for("acdc", {"dice_form": "linear"}), {}, SPECS["acdc"])
    assert len(problems) == 1 and "dice_form" in problems[0]
