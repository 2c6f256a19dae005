"""MC-Net+ "v2" nets: one shared encoder, three decoders that differ only in how they upsample.

- "mcnet3d" (LA): V-Net encoder; decoders ConvTranspose3d / trilinear (align_corners=True, as
  MC-Net's VNet.py) + 3x3x3 conv /
  nearest + 3x3x3 conv, each followed by BN-ReLU. build("mcnet3d", 1, 2): 15,246,566 params.
- "mcnet2d" (ACDC): U-Net encoder; decoders 1x1 conv + bilinear (align_corners=True) /
  ConvTranspose2d(k2, s2) / 1x1 conv + nearest, in MC-Net's order, no decoder dropout. build("mcnet2d", 1, 4):
  3,210,924 params = encoder 1,180,464 + 763,860 (ConvTranspose) + 2 x 633,300 (interpolating).
  Two decoders would give 2,577,624 and four (adding bicubic) 3,844,224, so v2 has three.

``forward`` uses the first decoder only (3D: ConvTranspose, 2D: bilinear), as the reference
tests do;
``forward_all`` returns one logits tensor per decoder, in the order of ``upsample_modes``.
"""

from __future__ import annotations

from collections.abc import Sequence

from agcl.nets import unet as unet_parts
from agcl.nets import vnet as vnet_parts
from agcl.nets.registry import EncoderDecoder, register_net

MCNET3D_V2_MODES = ("deconv", "trilinear", "nearest")
# MC-Net's MCNet2d_v2: decoder1 up_type 1 (bilinear), decoder2 up_type 0 (ConvTranspose),
# decoder3 up_type 2 (nearest); its tests use decoder 1, the bilinear one.
MCNET2D_V2_MODES = ("bilinear", "deconv", "nearest")


class MCNet3d(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, n_filters: int = 16,
                 has_dropout: bool = True, upsample_modes: Sequence[str] = MCNET3D_V2_MODES):
        super().__init__(
            vnet_parts.VNetEncoder(in_channels, n_filters, has_dropout),
            [vnet_parts.VNetDecoder(num_classes, n_filters, mode, has_dropout)
             for mode in upsample_modes],
            in_channels=in_channels, spatial_dims=3, feature_channels=n_filters,
        )


class MCNet2d(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, base_features: int = 16,
                 has_dropout: bool = True, upsample_modes: Sequence[str] = MCNET2D_V2_MODES):
        super().__init__(
            unet_parts.UNetEncoder(in_channels, base_features, has_dropout),
            [unet_parts.UNetDecoder(num_classes, base_features, mode) for mode in upsample_modes],
            in_channels=in_channels, spatial_dims=2, feature_channels=base_features,
        )


@register_net("mcnet3d")
def mcnet3d(in_channels: int, num_classes: int, *, n_filters: int = 16, has_dropout: bool = True,
            upsample_modes: Sequence[str] = MCNET3D_V2_MODES) -> MCNet3d:
    return MCNet3d(in_channels, num_classes, n_filters, has_dropout, upsample_modes)


@register_net("mcnet2d")
def mcnet2d(in_channels: int, num_classes: int, *, base_features: int = 16,
            has_dropout: bool = True, upsample_modes: Sequence[str] = MCNET2D_V2_MODES) -> MCNet2d:
    return MCNet2d(in_channels, num_classes, base_features, has_dropout, upsample_modes)
