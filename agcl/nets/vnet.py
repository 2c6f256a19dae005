"""3D V-Net as used by UA-MT, MC-Net, SS-Net and BCP on LA.

Widths n, 2n, 4n, 8n, 16n (n = n_filters = 16 upstream); encoder stages of 1, 2, 3, 3, 3
Conv3x3x3-BN-ReLU, decoder stages 3, 3, 2, 1; stride-2 kernel-2 conv down; upsampling then
ADDITIVE skips; Dropout3d(0.5) on the bottleneck and before the 1x1x1 output conv when
``has_dropout``. build("vnet", 1, 2) has 9,448,866 parameters. PyTorch default initialisation.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from agcl.nets.registry import EncoderDecoder, register_net

ENCODER_STAGES = (1, 2, 3, 3, 3)
DECODER_STAGES = (3, 3, 2, 1)  # from the bottleneck up
UPSAMPLE_MODES = ("deconv", "trilinear", "nearest")


def conv_stage(num_convs: int, in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [
            nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 2, stride=2),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


def up_block(in_channels: int, out_channels: int, mode: str = "deconv") -> nn.Sequential:
    """2x upsampling: ConvTranspose3d, or interpolation followed by a 3x3x3 conv (MC-Net+)."""
    if mode == "deconv":
        layers: list[nn.Module] = [nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)]
    elif mode in ("trilinear", "nearest"):
        # MC-Net's VNet.py upsamples trilinearly with align_corners=True (undefined for nearest).
        align = True if mode == "trilinear" else None
        layers = [
            nn.Upsample(scale_factor=2, mode=mode, align_corners=align),
            nn.Conv3d(in_channels, out_channels, 3, padding=1),
        ]
    else:
        raise ValueError(f"VNet upsampling mode: expected one of {UPSAMPLE_MODES}, got {mode!r}")
    return nn.Sequential(*layers, nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True))


def widths(n_filters: int) -> list[int]:
    if n_filters < 1:
        raise ValueError(f"VNet n_filters: expected a positive int, got {n_filters!r}")
    return [n_filters * 2**level for level in range(len(ENCODER_STAGES))]


class VNetEncoder(nn.Module):
    def __init__(self, in_channels: int, n_filters: int = 16, has_dropout: bool = True):
        super().__init__()
        chans = widths(n_filters)
        stage_inputs = [in_channels, *chans[1:]]  # later stages take the down block's output
        self.stages = nn.ModuleList(
            conv_stage(n, cin, cout) for n, cin, cout in zip(ENCODER_STAGES, stage_inputs, chans)
        )
        self.downs = nn.ModuleList(down_block(a, b) for a, b in itertools.pairwise(chans))
        self.dropout = nn.Dropout3d(0.5) if has_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.stages[0](x)]
        for down, stage in zip(self.downs, self.stages[1:]):
            skips.append(stage(down(skips[-1])))
        skips[-1] = self.dropout(skips[-1])
        return skips


class VNetDecoder(nn.Module):
    """Maps the encoder's skip list to (logits, last feature map before the output conv)."""

    def __init__(self, num_classes: int, n_filters: int = 16, upsample: str = "deconv",
                 has_dropout: bool = True):
        super().__init__()
        chans = widths(n_filters)[::-1]  # bottleneck first
        self.ups = nn.ModuleList(up_block(a, b, upsample) for a, b in itertools.pairwise(chans))
        self.stages = nn.ModuleList(conv_stage(n, c, c) for n, c in zip(DECODER_STAGES, chans[1:]))
        self.dropout = nn.Dropout3d(0.5) if has_dropout else nn.Identity()
        self.out_conv = nn.Conv3d(n_filters, num_classes, 1)

    def features(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """The last feature map before the dropout and the output conv."""
        x = skips[-1]
        for up, stage, skip in zip(self.ups, self.stages, reversed(skips[:-1])):
            x = stage(up(x) + skip)
        return x

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(skips)
        return self.out_conv(self.dropout(x)), x


class VNet(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, n_filters: int = 16,
                 has_dropout: bool = True):
        super().__init__(
            VNetEncoder(in_channels, n_filters, has_dropout),
            [VNetDecoder(num_classes, n_filters, "deconv", has_dropout)],
            in_channels=in_channels, spatial_dims=3, feature_channels=n_filters,
        )


@register_net("vnet")
def vnet(in_channels: int, num_classes: int, *, n_filters: int = 16,
         has_dropout: bool = True) -> VNet:
    return VNet(in_channels, num_classes, n_filters, has_dropout)
