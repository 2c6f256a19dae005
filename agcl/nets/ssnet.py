"""SS-Net's 3D V-Net (Wu et al., MICCAI 2022; ycwu1997/SS-Net code/networks/VNet.py): our V-Net
whose ``forward_features`` returns the embedding SS-Net contrasts, the last decoder map AFTER
the decoder's Dropout3d (VNet.py:233-237 returns ``out_seg, x9`` with ``x9`` dropped out),
where "vnet" returns it before the dropout.

Layers, widths and parameter names are "vnet"'s (build("ssnet3d", 1, 2): 9,448,866 parameters,
the state dict loads into "vnet" and back); ``forward`` gives the same logits. SS-Net's 2D U-Net
(unet.py) is our "unet" as it is: its decoder has no dropout, so its ``x_last`` is "unet"'s
features. SS-Net's projection, prediction and selector heads (VNet.py:245-275, unet.py:128-158)
are SSNetHeads below, not part of a registered net: the ss_net method holds them beside its net
and trains them with it, so that evaluation builds and loads the segmentation net alone.
"""

from __future__ import annotations

import torch
from torch import nn

from agcl.nets.registry import EncoderDecoder, register_net
from agcl.nets.vnet import VNetDecoder, VNetEncoder


class SSNetVNetDecoder(VNetDecoder):
    """VNetDecoder whose features are the dropped-out map the output conv reads."""

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.features(skips))  # VNet.py:234-237: the embedding after dropout
        return self.out_conv(x), x


class SSNet3d(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, n_filters: int = 16,
                 has_dropout: bool = True):
        super().__init__(
            VNetEncoder(in_channels, n_filters, has_dropout),
            [SSNetVNetDecoder(num_classes, n_filters, "deconv", has_dropout)],
            in_channels=in_channels, spatial_dims=3, feature_channels=n_filters,
        )


@register_net("ssnet3d")
def ssnet3d(in_channels: int, num_classes: int, *, n_filters: int = 16,
            has_dropout: bool = True) -> SSNet3d:
    # net_factory.py:7-8 trains VNet(normalization='batchnorm', has_dropout=True)
    return SSNet3d(in_channels, num_classes, n_filters, has_dropout)


def _mlp(in_features: int, hidden: int, out_features: int, activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), activation,
                         nn.Linear(hidden, out_features))


class SSNetHeads(nn.Module):
    """SS-Net's heads on the per-voxel embedding (VNet.py:245-275, unet.py:128-158): a projection
    MLP (in -> d -> d), a prediction MLP (d -> d -> d), both Linear-BN-ReLU-Linear, and per class
    two selectors Linear-BN-LeakyReLU(0.2)-Linear (d -> d -> 1) that weight the contrasted
    vectors ("contrastive_class_selector_<c>") and the memory vectors
    ("contrastive_class_selector_memory<c>"). SS-Net fixes in = 16 (its nets' last width) and
    d = 32 (feat_dim); here `in_features` is the net's feature_channels. Each head reads (N, F)
    rows, so its BatchNorm1d normalises over the N voxels of one call.
    """

    def __init__(self, in_features: int, num_classes: int, feat_dim: int = 32):
        super().__init__()
        self.projection = _mlp(in_features, feat_dim, feat_dim, nn.ReLU(inplace=True))
        self.prediction = _mlp(feat_dim, feat_dim, feat_dim, nn.ReLU(inplace=True))
        self.selectors = nn.ModuleList(
            _mlp(feat_dim, feat_dim, 1, nn.LeakyReLU(0.2, inplace=True)) for _ in range(num_classes))
        self.memory_selectors = nn.ModuleList(
            _mlp(feat_dim, feat_dim, 1, nn.LeakyReLU(0.2, inplace=True)) for _ in range(num_classes))
