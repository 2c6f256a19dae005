"""Segmentation nets behind a timm-style registry: ``build("vnet", in_channels, num_classes)``.

Importing this package registers "vnet", "vnet_sdf", "unet", "mcnet3d", "mcnet2d", "ssnet3d",
"urpc2d" and "urpc3d"; see ``agcl.nets.registry`` for the interface every built net implements.
"""

from agcl.nets import (  # noqa: F401  (imported so that they register)
    mcnet,
    ssnet,
    unet,
    urpc,
    vnet,
    vnet_sdf,
)
from agcl.nets.heads import ProjectionHead
from agcl.nets.registry import build, list_nets, register_net

__all__ = ["ProjectionHead", "build", "list_nets", "register_net"]
