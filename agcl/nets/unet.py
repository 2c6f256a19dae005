"""2D U-Net as used by SSL4MIS on ACDC.

Widths f, 2f, 4f, 8f, 16f (f = base_features = 16 upstream); block Conv3x3-BN-LeakyReLU-Dropout-
Conv3x3-BN-LeakyReLU with encoder dropout 0.05, 0.1, 0.2, 0.3, 0.5 (none in the decoder); 2x2
max-pool down; up = 1x1 conv then bilinear x2 (align_corners=True), CONCATENATED skips; 3x3 output
conv. build("unet", 1, 4) has 1,813,764 parameters. LeakyReLU slope 0.01 (PyTorch default),
PyTorch default initialisation. ``has_dropout=False`` removes every dropout layer.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from agcl.nets.registry import EncoderDecoder, register_net

ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)
UPSAMPLE_MODES = ("bilinear", "deconv", "nearest")


def conv_block(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(),
        nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(),
    )


def up_layer(in_channels: int, out_channels: int, mode: str = "bilinear") -> nn.Sequential:
    """2x upsampling to ``out_channels``: ConvTranspose2d, or a 1x1 conv then interpolation."""
    if mode == "deconv":
        return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2))
    if mode in ("bilinear", "nearest"):
        # A 1x1 conv commutes with interpolation, so convolving first is the cheaper order.
        align = True if mode == "bilinear" else None
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1),
            nn.Upsample(scale_factor=2, mode=mode, align_corners=align),
        )
    raise ValueError(f"UNet upsampling mode: expected one of {UPSAMPLE_MODES}, got {mode!r}")


def widths(base_features: int) -> list[int]:
    if base_features < 1:
        raise ValueError(f"UNet base_features: expected a positive int, got {base_features!r}")
    return [base_features * 2**level for level in range(len(ENCODER_DROPOUT))]


class UNetEncoder(nn.Module):
    def __init__(self, in_channels: int, base_features: int = 16, has_dropout: bool = True):
        super().__init__()
        chans = widths(base_features)
        drops = ENCODER_DROPOUT if has_dropout else (0.0,) * len(ENCODER_DROPOUT)
        self.blocks = nn.ModuleList(
            conv_block(cin, cout, p) for cin, cout, p in zip([in_channels, *chans], chans, drops)
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.blocks[0](x)]
        for block in self.blocks[1:]:
            skips.append(block(self.pool(skips[-1])))
        return skips


class UNetDecoder(nn.Module):
    """Maps the encoder's skip list to (logits, last feature map before the output conv)."""

    def __init__(self, num_classes: int, base_features: int = 16, upsample: str = "bilinear"):
        super().__init__()
        chans = widths(base_features)[::-1]  # bottleneck first
        self.ups = nn.ModuleList(up_layer(a, b, upsample) for a, b in itertools.pairwise(chans))
        self.blocks = nn.ModuleList(conv_block(2 * c, c, 0.0) for c in chans[1:])
        self.out_conv = nn.Conv2d(base_features, num_classes, 3, padding=1)

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = skips[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips[:-1])):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.out_conv(x), x


class UNet(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, base_features: int = 16,
                 has_dropout: bool = True):
        super().__init__(
            UNetEncoder(in_channels, base_features, has_dropout),
            [UNetDecoder(num_classes, base_features, "bilinear")],
            in_channels=in_channels, spatial_dims=2, feature_channels=base_features,
        )


@register_net("unet")
def unet(in_channels: int, num_classes: int, *, base_features: int = 16,
         has_dropout: bool = True) -> UNet:
    return UNet(in_channels, num_classes, base_features, has_dropout)
