"""URPC's pyramid-prediction nets (Luo et al., MedIA 2022), as SSL4MIS builds them.

One encoder-decoder that predicts at four decoder scales; every scale's logits are brought to the
input size. ``forward`` returns the finest, main output only (SSL4MIS validates and tests on it:
val_2D.py:54 ``output_main, _, _, _ = net(input)``, val_urpc_util.py:62 ``y1, _, _, _``,
test_urpc_util.py:68 ``y = y_main``); ``forward_all`` returns the four, main first, then the 1/2,
1/4 and 1/8 scales (the training scripts' output order). ``num_decoders`` is 4: one output per
pyramid level, all from the same decoder.

- "urpc2d" (ACDC): SSL4MIS networks/unet.py UNet_URPC (:352-370) with Decoder_URPC (:209-269).
  The SSL4MIS U-Net encoder and decoder (agcl.nets.unet: 1x1 conv + bilinear x2 up, concatenated
  skips); a 3x3 conv head on the decoder map after up stages 1, 2, 3 (8f, 4f, 2f channels) and the
  3x3 output conv after stage 4; the auxiliary logits are brought to the input size by nearest
  interpolation (F.interpolate's default mode, unet.py:251/258/265). In train mode each
  auxiliary head sees a perturbed copy of its feature map (the trunk goes on unperturbed):
  1/8: dropout p 0.5 (unet.py:248, 272-274); 1/4: feature dropout, zeroing positions whose
  channel-mean exceeds u x its per-sample maximum, u ~ U(0.7, 0.9) once per call (:255, 277-285);
  1/2: feature noise x + x * r, r ~ U(-0.3, 0.3) of shape (C, H, W) shared over the batch (:262,
  288-301). Upstream's out_conv_dp4 (:230, a 16f -> K conv on the bottleneck) is never used in
  the forward pass; it is left out, so build("urpc2d", 1, 4) has 1,821,840 parameters (UNet_URPC:
  1,831,060 = these + 9,220 dead ones). PyTorch default initialisation (net_factory.py builds
  UNet_URPC without an init call).
- "urpc3d" (LA): SSL4MIS networks/unet_3D_dv_semi.py (with networks/utils.py UnetConv3,
  UnetUp3_CT, UnetDsv3), as train_uncertainty_rectified_pyramid_consistency_3D.py:87 builds it
  (feature_scale 4: widths n, 2n, 4n, 8n, 16n with n = n_filters = 16). Blocks of two Conv3x3x3-
  InstanceNorm3d (affine off, upstream's ``is_batchnorm`` notwithstanding: utils.py:103-109)-ReLU;
  2x2x2 max-pool down; up = trilinear x2 (align_corners False) of the coarser map, concatenated
  AFTER the skip, then a block; Dropout3d 0.5, 0.3, 0.2, 0.1 on the outputs of up stages 1-4,
  in the trunk (so they reach every later scale, main included; unet_3D_dv_semi.py:88-98); heads
  1x1x1 conv then trilinear x8 / x4 / x2 (align_corners False) for the 1/8, 1/4, 1/2 scales,
  a 1x1x1 conv for the main one. Conv weights Kaiming-normal (fan_in, a = 0), biases PyTorch's
  default (unet_3D_dv_semi.py:67-71, networks_other.py:40-48). build("urpc3d", 1, 2) has
  5,884,504 parameters, as unet_3D_dv_semi(n_classes=2, in_channels=1).

Randomness: dropout draws from torch's global generator (on the input's device), the feature-
dropout factor and the feature noise from torch's global CPU generator (the noise is then moved
to the input's device, as upstream's Uniform.sample). Upstream draws the factor from numpy's
global generator (np.random.uniform); here one torch generator, which the engine re-seeds before
every step (agcl.runtime.random_streams.seed_globals) and a test seeds with torch.manual_seed alone.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from agcl.nets import unet as unet_parts
from agcl.nets.registry import EncoderDecoder, register_net

PYRAMID_LEVELS = 4  # main + the 1/2, 1/4, 1/8 scales
# 2D perturbations of the auxiliary heads (SSL4MIS networks/unet.py:248, 281, 289)
AUX_DROPOUT = 0.5
FEATURE_DROP_RANGE = (0.7, 0.9)
FEATURE_NOISE = 0.3
# 3D decoder dropout after up stages 1..4, coarse to fine (unet_3D_dv_semi.py:61-64)
DECODER_DROPOUT_3D = (0.5, 0.3, 0.2, 0.1)


def uniform_scalar(low: float, high: float) -> float:
    """One draw of U(low, high) from torch's global CPU generator, as a Python float (no device
    sync). Stands for upstream's np.random.uniform(low, high) in FeatureDropout."""
    return low + (high - low) * float(torch.rand((), dtype=torch.float64))


def feature_dropout(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Zero the positions whose channel mean reaches u x that sample's largest channel mean,
    u ~ U(low, high) once per call (SSL4MIS unet.py:277-285)."""
    attention = x.mean(dim=1, keepdim=True)
    peak = attention.flatten(1).amax(dim=1)
    threshold = (peak * uniform_scalar(low, high)).view(-1, *([1] * (x.ndim - 1)))
    return x * (attention < threshold).to(x.dtype)


def feature_noise(x: torch.Tensor, amplitude: float) -> torch.Tensor:
    """x + x * r, r ~ U(-amplitude, amplitude) of shape (C, *spatial), one draw shared by the
    batch, drawn on the CPU in the default dtype and moved to x's device (unet.py:288-301)."""
    low, high = torch.tensor(-amplitude), torch.tensor(amplitude)
    noise = low + torch.rand(x.shape[1:]) * (high - low)
    return x * noise.to(x.device).unsqueeze(0) + x


class URPCDecoder2d(nn.Module):
    """SSL4MIS Decoder_URPC: the U-Net decoder plus three auxiliary 3x3 heads.

    ``aux_convs`` is ordered as the outputs, finest first: on the maps after up stages 3, 2, 1
    (2f, 4f, 8f channels). ``aux_perturbations=False`` feeds the heads clean maps in train mode.
    """

    def __init__(self, num_classes: int, base_features: int = 16, aux_perturbations: bool = True,
                 aux_dropout: float = AUX_DROPOUT,
                 feature_drop_range: tuple[float, float] = FEATURE_DROP_RANGE,
                 feature_noise_amplitude: float = FEATURE_NOISE):
        super().__init__()
        chans = unet_parts.widths(base_features)[::-1]  # bottleneck first
        self.ups = nn.ModuleList(unet_parts.up_layer(a, b, "bilinear")
                                 for a, b in itertools.pairwise(chans))
        self.blocks = nn.ModuleList(unet_parts.conv_block(2 * c, c, 0.0) for c in chans[1:])
        self.out_conv = nn.Conv2d(base_features, num_classes, 3, padding=1)
        # finest first: 2f (after up stage 3), 4f (stage 2), 8f (stage 1)
        self.aux_convs = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=1)
                                       for c in chans[1:-1][::-1])
        self.aux_perturbations = aux_perturbations
        self.aux_dropout = aux_dropout
        self.feature_drop_range = tuple(feature_drop_range)
        self.feature_noise_amplitude = feature_noise_amplitude

    def _perturb(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """The train-time perturbation of the head at pyramid `level` (1 = 1/2 ... 3 = 1/8)."""
        if not (self.training and self.aux_perturbations):
            return x
        if level == 3:
            return F.dropout(x, self.aux_dropout, training=True)
        if level == 2:
            return feature_dropout(x, *self.feature_drop_range)
        return feature_noise(x, self.feature_noise_amplitude)

    def _trunk(self, skips: list[torch.Tensor], with_aux: bool):
        """(last map, auxiliary logits finest first, at the input size; [] unless with_aux)."""
        size = skips[0].shape[2:]
        x = skips[-1]
        aux = []
        for stage, (up, block, skip) in enumerate(zip(self.ups, self.blocks,
                                                      reversed(skips[:-1]))):
            x = block(torch.cat([skip, up(x)], dim=1))
            level = len(self.blocks) - 1 - stage  # 3, 2, 1, then 0 (the main output)
            if with_aux and level > 0:
                logits = self.aux_convs[level - 1](self._perturb(x, level))
                aux.insert(0, F.interpolate(logits, size=size))  # nearest, as upstream
        return x, aux

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self._trunk(skips, with_aux=False)
        return self.out_conv(x), x

    def pyramid(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        x, aux = self._trunk(skips, with_aux=True)
        return [self.out_conv(x), *aux]


def conv_in_relu_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """SSL4MIS UnetConv3 (3x3x3, padding 1): two Conv3d-InstanceNorm3d-ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1),
        nn.InstanceNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, 3, padding=1),
        nn.InstanceNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


def widths_3d(n_filters: int) -> list[int]:
    if n_filters < 1:
        raise ValueError(f"urpc3d n_filters: expected a positive int, got {n_filters!r}")
    return [n_filters * 2**level for level in range(5)]


class URPCEncoder3d(nn.Module):
    def __init__(self, in_channels: int, n_filters: int = 16):
        super().__init__()
        chans = widths_3d(n_filters)
        self.blocks = nn.ModuleList(conv_in_relu_block(a, b)
                                    for a, b in zip([in_channels, *chans], chans))
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.blocks[0](x)]
        for block in self.blocks[1:]:
            skips.append(block(self.pool(skips[-1])))
        return skips


class URPCDecoder3d(nn.Module):
    """unet_3D_dv_semi's decoder and deep-supervision heads; ``aux_convs`` finest first (2n, 4n,
    8n channels: upstream dsv2, dsv3, dsv4), each followed by trilinear upsampling to full size."""

    def __init__(self, num_classes: int, n_filters: int = 16, has_dropout: bool = True):
        super().__init__()
        chans = widths_3d(n_filters)[::-1]  # bottleneck first
        self.up = nn.Upsample(scale_factor=2, mode="trilinear")
        self.blocks = nn.ModuleList(conv_in_relu_block(a + b, b)
                                    for a, b in itertools.pairwise(chans))
        drops = DECODER_DROPOUT_3D if has_dropout else (0.0,) * len(DECODER_DROPOUT_3D)
        self.dropouts = nn.ModuleList(nn.Dropout3d(p) if p > 0 else nn.Identity() for p in drops)
        self.out_conv = nn.Conv3d(n_filters, num_classes, 1)
        self.aux_convs = nn.ModuleList(nn.Conv3d(c, num_classes, 1) for c in chans[1:-1][::-1])
        self.aux_ups = nn.ModuleList(nn.Upsample(scale_factor=2**level, mode="trilinear")
                                     for level in range(1, len(self.aux_convs) + 1))

    def _trunk(self, skips: list[torch.Tensor]):
        """(last map before its dropout, every stage's map after its dropout, coarse first)."""
        x = skips[-1]
        stages = []
        for block, dropout, skip in zip(self.blocks, self.dropouts, reversed(skips[:-1])):
            before = block(torch.cat([skip, self.up(x)], dim=1))
            x = dropout(before)
            stages.append(x)
        return before, stages

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features, stages = self._trunk(skips)
        return self.out_conv(stages[-1]), features

    def pyramid(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        _, stages = self._trunk(skips)
        finest_first = stages[::-1]
        aux = [up(conv(x)) for conv, up, x in zip(self.aux_convs, self.aux_ups, finest_first[1:])]
        return [self.out_conv(finest_first[0]), *aux]


class URPCNet(EncoderDecoder):
    """One encoder, one pyramid decoder; forward_all gives the four scales' logits."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, *, in_channels: int,
                 spatial_dims: int, feature_channels: int):
        super().__init__(encoder, [decoder], in_channels=in_channels, spatial_dims=spatial_dims,
                         feature_channels=feature_channels)
        self.num_decoders = PYRAMID_LEVELS  # outputs of forward_all, one per pyramid level

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoders[0].pyramid(self._encode(x))


def kaiming_conv_init(net: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_in, a = 0) weights for every Conv3d, biases left at PyTorch's
    default (unet_3D_dv_semi.py:67-71 -> networks_other.py weights_init_kaiming)."""
    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
    return net


@register_net("urpc2d")
def urpc2d(in_channels: int, num_classes: int, *, base_features: int = 16,
           has_dropout: bool = True, aux_perturbations: bool = True,
           aux_dropout: float = AUX_DROPOUT,
           feature_drop_range: tuple[float, float] = FEATURE_DROP_RANGE,
           feature_noise: float = FEATURE_NOISE) -> URPCNet:
    """``has_dropout`` switches the encoder's dropout, ``aux_perturbations`` the heads' ones."""
    decoder = URPCDecoder2d(num_classes, base_features, aux_perturbations, aux_dropout,
                            feature_drop_range, feature_noise)
    return URPCNet(unet_parts.UNetEncoder(in_channels, base_features, has_dropout), decoder,
                   in_channels=in_channels, spatial_dims=2, feature_channels=base_features)


@register_net("urpc3d")
def urpc3d(in_channels: int, num_classes: int, *, n_filters: int = 16,
           has_dropout: bool = True) -> URPCNet:
    """``has_dropout`` switches the decoder's four Dropout3d (upstream always has them)."""
    net = URPCNet(URPCEncoder3d(in_channels, n_filters),
                  URPCDecoder3d(num_classes, n_filters, has_dropout),
                  in_channels=in_channels, spatial_dims=3, feature_channels=n_filters)
    return kaiming_conv_init(net)
