"""Methods: what a method file imports to define and register one."""

from agcl.methods.base import (
    AuxiliaryUpdate,
    Batch,
    HParam,
    Method,
    TrainedNetwork,
    require_unlabeled,
)
from agcl.methods.registry import register_method

__all__ = ["AuxiliaryUpdate", "Batch", "HParam", "Method", "TrainedNetwork", "register_method",
           "require_unlabeled"]
