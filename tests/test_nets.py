"""Nets: exact reference parameter counts, the uniform interface, dropout, bf16, registry, head."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from agcl.nets import ProjectionHead, build, list_nets, register_net, registry
from tests.conftest import cpu_bf16_autocast

# (in_channels, num_classes) -> parameter count of the reference implementations.
REFERENCE_COUNTS = {
    "vnet": (1, 2, 9_448_866),
    "unet": (1, 4, 1_813_764),
    "mcnet3d": (1, 2, 15_246_566),
    "mcnet2d": (1, 4, 3_210_924),
    "vnet_sdf": (1, 2, 9_448_866),  # DTC's / SASSnet's vnet_sdf.VNet(n_classes=1)
    "ssnet3d": (1, 2, 9_448_866),  # SS-Net's VNet without its heads (tests/test_ref_ss_net.py)
    "urpc2d": (1, 4, 1_821_840),  # SSL4MIS UNet_URPC less its unused out_conv_dp4 (9,220)
    "urpc3d": (1, 2, 5_884_504),  # SSL4MIS unet_3D_dv_semi
}

# Small widths and inputs so that every registered net runs a forward pass in well under a second,
# derived from the width option each builder takes (a new net needs no entry here): n_filters ->
# a 3D input and 2 classes (LA), base_features -> a 2D input and 4 classes (ACDC).
WIDTH_OPTIONS = {"n_filters": ((2, 1, 32, 32, 16), 2), "base_features": ((2, 1, 32, 32), 4)}


def small_config(name: str) -> tuple[dict, tuple, int]:
    params = inspect.signature(registry._NETS[name]).parameters
    for option, (shape, num_classes) in WIDTH_OPTIONS.items():
        if option in params:
            return {option: 4}, shape, num_classes
    raise AssertionError(f"net {name!r} takes neither width option ({', '.join(WIDTH_OPTIONS)})")


SMALL = {name: small_config(name) for name in list_nets()}
# name -> (spatial_dims, num_decoders) of the nets this file knows; any other registered net is
# checked against its input's rank and its own forward_all
EXPECTED_LAYOUT = {
    "vnet": (3, 1), "mcnet3d": (3, 3), "unet": (2, 1), "mcnet2d": (2, 3),
    "vnet_sdf": (3, 1), "ssnet3d": (3, 1), "urpc2d": (2, 4), "urpc3d": (3, 4),
}


def small_net(name: str, **overrides) -> tuple[nn.Module, torch.Tensor, int]:
    kw, shape, num_classes = SMALL[name]
    torch.manual_seed(0)
    net = build(name, shape[1], num_classes, **{**kw, **overrides})
    return net, torch.randn(shape), num_classes


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_count_matches_reference(name):
    in_channels, num_classes, expected = REFERENCE_COUNTS[name]
    with torch.device("meta"):  # counts only: skip allocating and initialising the weights
        net = build(name, in_channels, num_classes)
    assert n_params(net) == expected


def test_every_registered_net_has_small_test_config():
    assert list_nets() == sorted(SMALL) and set(EXPECTED_LAYOUT) <= set(list_nets())
    # importing agcl.nets registers every net module of the package, without a list to edit
    modules = {p.stem for p in Path(registry.__file__).parent.glob("*.py")}
    assert {registry._NETS[n].__module__.rsplit(".", 1)[1] for n in list_nets()} <= modules


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_interface_shapes(name):
    net, x, num_classes = small_net(name)
    spatial_dims, num_decoders = EXPECTED_LAYOUT.get(name, (x.ndim - 2, net.num_decoders))
    assert (net.spatial_dims, net.num_decoders, net.feature_channels) == (
        spatial_dims, num_decoders, 4)
    net.eval()
    with torch.no_grad():
        logits = net(x)
        logits_f, features = net.forward_features(x)
        all_logits = net.forward_all(x)
    assert logits.shape == (2, num_classes, *x.shape[2:])
    assert features.shape == (2, net.feature_channels, *x.shape[2:])
    assert torch.equal(logits_f, logits)
    assert len(all_logits) == num_decoders
    assert all(out.shape == logits.shape for out in all_logits)
    assert torch.equal(all_logits[0], logits)  # inference uses the first decoder
    if num_decoders > 1:  # decoders are separate modules, so their outputs differ
        assert not torch.allclose(all_logits[0], all_logits[1])
    # the documented halves: encode -> skips, decode(skips, k) -> (logits, features)
    with torch.no_grad():
        skips = net.encode(x)
        assert [s.shape[0] for s in skips] == [2] * len(skips)
        logits_d, features_d = net.decode(skips)
        last = net.decode(skips, len(net.decoders) - 1)[0]
        perturbed = net.decode([torch.nn.functional.dropout(s, 0.5) for s in skips])[0]
    assert torch.equal(logits_d, logits) and torch.equal(features_d, features)
    if len(net.decoders) == num_decoders:  # (URPC: one decoder, four pyramid outputs)
        assert torch.equal(last, all_logits[-1])
    assert not torch.equal(perturbed, logits)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_all_reaches_every_parameter(name):
    net, x, _ = small_net(name)
    outputs = [*net.forward_all(x), *(net.forward_sdf(x) if hasattr(net, "forward_sdf") else ())]
    sum(out.sum() for out in outputs).backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert unused == []


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dropout_only_in_train_mode_and_only_when_enabled(name):
    net, x, _ = small_net(name, has_dropout=True)
    net.train()
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))
    plain, x, _ = small_net(name, has_dropout=False)
    plain.train()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_autocast_forward_on_cpu(name):
    net, x, num_classes = small_net(name)
    with torch.no_grad(), cpu_bf16_autocast():
        outs = net.forward_all(x)
    for out in outs:
        assert out.shape == (2, num_classes, *x.shape[2:])
        assert out.dtype == torch.bfloat16  # the convolutions really ran in bf16
        assert torch.isfinite(out.float()).all()


def test_input_not_divisible_by_16_is_rejected():
    net, _, _ = small_net("vnet")
    with pytest.raises(ValueError, match=r"multiple of 16, got \(32, 24, 16\)"):
        net(torch.zeros(1, 1, 32, 24, 16))


def test_input_with_wrong_channels_or_dims_is_rejected():
    net, _, _ = small_net("unet")
    with pytest.raises(ValueError, match=r"expected shape \(B, 1, S, S\).*got \(1, 3, 32, 32\)"):
        net(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"4 dims"):
        net(torch.zeros(1, 1, 32, 32, 16))


def test_unknown_net_lists_known_names():
    with pytest.raises(KeyError, match="unknown net 'vnett'.*mcnet2d, mcnet3d, ssnet3d, unet, urpc2d, urpc3d, vnet, vnet_sdf"):
        build("vnett", 1, 2)


def test_unknown_upsampling_mode_is_rejected():
    with pytest.raises(ValueError, match="upsampling mode.*'bicubic'"):
        build("mcnet3d", 1, 2, n_filters=2, upsample_modes=("deconv", "bicubic"))


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(registry, "_NETS", dict(registry._NETS))  # keep the real registry clean
    with pytest.raises(ValueError, match="'vnet' is already registered"):
        register_net("vnet")(lambda in_channels, num_classes: None)
    register_net("tiny_unet")(lambda c, k: build("unet", c, k, base_features=2))
    assert "tiny_unet" in list_nets()
    with pytest.raises(ValueError, match="'tiny_unet' is already registered"):
        register_net("tiny_unet")(lambda c, k: None)


def test_build_rejects_a_module_without_the_interface(monkeypatch):
    monkeypatch.setattr(registry, "_NETS", dict(registry._NETS))
    register_net("bare_conv")(lambda c, k: nn.Conv2d(c, k, 1))
    with pytest.raises(TypeError, match="'bare_conv' lacks the net interface: missing spatial_dims"):
        build("bare_conv", 1, 2)


@pytest.mark.parametrize("spatial_dims, shape", [(2, (3, 8, 6, 5)), (3, (2, 8, 4, 3, 2))])
def test_projection_head_outputs_unit_vectors_per_position(spatial_dims, shape):
    torch.manual_seed(0)
    head = ProjectionHead(8, hidden_channels=16, out_channels=5, spatial_dims=spatial_dims)
    out = head(torch.randn(shape) * 10)
    assert out.shape == (shape[0], 5, *shape[2:])
    norms = out.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_projection_head_rejects_1d():
    with pytest.raises(ValueError, match="spatial_dims: expected 2 or 3, got 1"):
        ProjectionHead(8, spatial_dims=1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_projection_head_embeds_each_position_on_its_own(spatial_dims):
    # No batch statistics: a patch's embedding is the same alone, beside another patch or in a
    # batch, in train mode (a BatchNorm over 2 patches made their embeddings complementary).
    torch.manual_seed(0)
    head = ProjectionHead(8, hidden_channels=16, out_channels=5, spatial_dims=spatial_dims).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    tail = [1] * (spatial_dims - 1)
    pair = torch.randn(1, 8, 2, *tail)
    both = head(pair)
    alone = torch.cat([head(pair[:, :, :1]), head(pair[:, :, 1:])], dim=2)
    torch.testing.assert_close(both, alone)
    assert (both[:, :, 0] + both[:, :, 1]).abs().max() > 1e-3  # not the +-1 complement
