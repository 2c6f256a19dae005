"""Projection head for Semi-AGCL's contrastive losses.

The paper does not give the head's sizes; the defaults here are ours (kept small because the head
can run on full-resolution decoder features, which are large for 3D patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


class ProjectionHead(nn.Module):
    """Per-position MLP (1x1 conv - ReLU - 1x1 conv), MoCo v2's head; output L2-normalised along
    channels.

    No BatchNorm: Semi-AGCL feeds the head one pooled vector per patch, so a BatchNorm would
    normalise over the step's kept patches, a handful on small crops; over 2 patches every hidden
    unit becomes +-1 and the two embeddings come out complementary whatever the patches hold.
    Each patch's embedding here depends on that patch alone.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 64, out_channels: int = 32, *,
                 spatial_dims: int):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"ProjectionHead spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        conv = _CONV[spatial_dims]
        self.spatial_dims = spatial_dims
        self.out_channels = out_channels
        self.mlp = nn.Sequential(
            conv(in_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            conv(hidden_channels, out_channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(features), dim=1)
