"""Segmentation nets behind a timm-style registry: ``build("vnet", in_channels, num_classes)``.

Importing this package registers "vnet", "unet", "mcnet3d", "mcnet2d", "urpc2d" and "urpc3d"; see
``agcl.nets.registry`` for the interface every built net implements.
"""

from agcl.nets import mcnet, unet, urpc, vnet  # noqa: F401  (imported so that they register)
from agcl.nets.heads import ProjectionHead
from agcl.nets.registry import build, list_nets, register_net

__all__ = ["ProjectionHead", "build", "list_nets", "register_net"]
