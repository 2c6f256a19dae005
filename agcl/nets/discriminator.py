"""SASSNet's shape discriminator (kleinzcy/SASSnet code/networks/discriminator.py:54-98,
FC3DDiscriminator): is this signed-distance map the prediction of a labeled or an unlabeled scan?

The map and the image each go through a 4^3 stride-2 convolution to ndf channels; their sum passes
LeakyReLU(0.2) and Dropout3d(0.5), then three more stride-2 convolutions (2 ndf, 4 ndf, 8 ndf;
the first two followed by LeakyReLU and dropout, the last by LeakyReLU), an average pool and a
linear layer to two logits (class 1: labeled).

One difference, at other patch sizes only: the reference pools with a fixed AvgPool3d((7, 7, 5)),
which is the mean over the whole 7x7x5 map that its 112x112x80 patch leaves, and fails on any
other patch. Here the pool is the global mean (adaptive), identical at 112x112x80 and defined for
the reduced patches of CPU runs.
"""

from __future__ import annotations

import torch
from torch import nn


class ShapeDiscriminator3d(nn.Module):
    def __init__(self, map_channels: int = 1, image_channels: int = 1, ndf: int = 64):
        super().__init__()

        def down(cin: int, cout: int) -> nn.Conv3d:
            return nn.Conv3d(cin, cout, kernel_size=4, stride=2, padding=1)

        self.map_conv = down(map_channels, ndf)
        self.image_conv = down(image_channels, ndf)
        self.convs = nn.ModuleList([down(ndf, 2 * ndf), down(2 * ndf, 4 * ndf),
                                    down(4 * ndf, 8 * ndf)])
        self.classifier = nn.Linear(8 * ndf, 2)
        self.activation = nn.LeakyReLU(negative_slope=0.2)
        self.dropout = nn.Dropout3d(0.5)

    def forward(self, distance_map: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.activation(self.map_conv(distance_map) + self.image_conv(image)))
        for index, conv in enumerate(self.convs):
            x = self.activation(conv(x))
            if index < len(self.convs) - 1:  # no dropout after the last convolution
                x = self.dropout(x)
        return self.classifier(x.mean(dim=(2, 3, 4)))


_REFERENCE_MODULES = {"conv0": "map_conv", "conv1": "image_conv", "conv2": "convs.0",
                      "conv3": "convs.1", "conv4": "convs.2", "classifier": "classifier"}


def from_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the reference's FC3DDiscriminator renamed for ShapeDiscriminator3d."""
    renamed = {}
    for key, value in state.items():
        block, rest = key.removeprefix("module.").split(".", 1)
        if block not in _REFERENCE_MODULES:
            raise KeyError(f"discriminator: {key!r} is not a parameter of the reference "
                           "FC3DDiscriminator")
        renamed[f"{_REFERENCE_MODULES[block]}.{rest}"] = value
    return renamed
