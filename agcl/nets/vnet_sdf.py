"""V-Net with a signed-distance head beside the segmentation head (DTC, SASSNet).

HiLab-git/DTC code/networks/vnet_sdf.py (VNet, built by train_la_dtc.py:113-114 as
VNet(n_channels=1, n_classes=num_classes - 1, normalization='batchnorm', has_dropout=True)) and
kleinzcy/SASSnet code/networks/vnet_sdf.py (the same class, same construction in
train_gan_sdfloss.py:94; the files differ only in their __main__ block). It is our V-Net
(agcl.nets.vnet: ConvBlock/Downsampling/UpsamplingDeconvBlock map one to one onto conv_stage,
down_block and up_block with BatchNorm), whose one decoder ends in two 1x1x1 convs on the same
dropped-out last feature map (vnet_sdf.py:235-241):

- ``out_conv``: one foreground logit z (the reference's ``out_conv2``, its ``out_seg``);
- ``sdf_conv`` + tanh: the signed distance map in [-1, 1] (the reference's ``out_conv`` + ``tanh``,
  its ``out_tanh``).

The reference segments with sigmoid(z) (train_la_dtc.py:173, test_util.py:110,122: > 0.5). The
engine and evaluation expect two-class logits for softmax / argmax, so ``forward`` returns
[0, z]: softmax([0, z])[1] = sigmoid(z) and argmax = (z > 0) (ties to background, as > 0.5).
``forward_sdf`` returns the raw (tanh signed distance, z) pair, each (B, 1, ...), that the
methods' losses use. build("vnet_sdf", 1, 2) has 9,448,866 parameters, as the reference's
VNet(1, 1, batchnorm) (one output channel fewer than "vnet", one 1x1x1 conv more).
"""

from __future__ import annotations

import torch
from torch import nn

from agcl.nets.registry import EncoderDecoder, register_net
from agcl.nets.vnet import VNetDecoder, VNetEncoder


def two_class_logits(foreground: torch.Tensor) -> torch.Tensor:
    """[0, z] along dim 1 from a single foreground logit z (B, 1, ...): its softmax is
    [1 - sigmoid(z), sigmoid(z)] and its argmax is z > 0."""
    return torch.cat([torch.zeros_like(foreground), foreground], dim=1)


class SdfVNetDecoder(VNetDecoder):
    """VNetDecoder with one foreground logit and a tanh signed-distance conv on the same input."""

    def __init__(self, n_filters: int = 16, has_dropout: bool = True):
        super().__init__(1, n_filters, "deconv", has_dropout)
        self.sdf_conv = nn.Conv3d(n_filters, 1, 1)

    def heads(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tanh signed distance, foreground logit, features): one dropout mask feeds both heads
        (vnet_sdf.py:235-241)."""
        features = self.features(skips)
        dropped = self.dropout(features)
        return torch.tanh(self.sdf_conv(dropped)), self.out_conv(dropped), features

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(skips)
        return two_class_logits(self.out_conv(self.dropout(features))), features


class SdfVNet(EncoderDecoder):
    def __init__(self, in_channels: int, n_filters: int = 16, has_dropout: bool = True):
        super().__init__(
            VNetEncoder(in_channels, n_filters, has_dropout),
            [SdfVNetDecoder(n_filters, has_dropout)],
            in_channels=in_channels, spatial_dims=3, feature_channels=n_filters,
        )

    def forward_sdf(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tanh signed distance, foreground logit), each (B, 1, ...): the reference's
        ``model(x)`` -> (out_tanh, out_seg)."""
        sdf, foreground, _ = self.decoders[0].heads(self._encode(x))
        return sdf, foreground


@register_net("vnet_sdf")
def vnet_sdf(in_channels: int, num_classes: int, *, n_filters: int = 16,
             has_dropout: bool = True) -> SdfVNet:
    if num_classes != 2:
        raise ValueError(f"vnet_sdf: a binary net (one sigmoid foreground channel, as DTC and "
                         f"SASSNet), so num_classes must be 2, got {num_classes}")
    return SdfVNet(in_channels, n_filters, has_dropout)


# The reference's top-level blocks -> our modules (their blocks wrap the layers in `.conv`).
_REFERENCE_MODULES = {
    **{f"block_{n}": f"encoder.stages.{i}"
       for i, n in enumerate(("one", "two", "three", "four", "five"))},
    **{f"block_{n}_dw": f"encoder.downs.{i}"
       for i, n in enumerate(("one", "two", "three", "four"))},
    **{f"block_{n}_up": f"decoders.0.ups.{i}"
       for i, n in enumerate(("five", "six", "seven", "eight"))},
    **{f"block_{n}": f"decoders.0.stages.{i}"
       for i, n in enumerate(("six", "seven", "eight", "nine"))},
    "out_conv": "decoders.0.sdf_conv",
    "out_conv2": "decoders.0.out_conv",
}


def from_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the reference's vnet_sdf.VNet (e.g. a released DTC / SASSNet checkpoint)
    renamed for SdfVNet.load_state_dict."""
    renamed = {}
    for key, value in state.items():
        block, rest = key.removeprefix("module.").split(".", 1)
        if block not in _REFERENCE_MODULES:
            raise KeyError(f"vnet_sdf: {key!r} is not a parameter of the reference VNet")
        renamed[f"{_REFERENCE_MODULES[block]}.{rest.removeprefix('conv.')}"] = value
    return renamed
