"""Segmentation nets behind a timm-style registry: ``build("vnet", in_channels, num_classes)``.

Importing this package imports every module in it, so each registers its nets ("vnet",
"vnet_sdf", "unet", "mcnet3d", "mcnet2d", "ssnet3d", "urpc2d", "urpc3d"): a new net is one module
here, with no list to edit. See ``agcl.nets.registry`` for the interface every built net
implements.
"""

import importlib
import pkgutil

from agcl.nets.heads import ProjectionHead
from agcl.nets.registry import build, list_nets, register_net

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ProjectionHead", "build", "list_nets", "register_net"]
