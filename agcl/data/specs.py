"""Fixed facts of each dataset: dimensionality, channels, classes, default network, eval mode."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    spatial_dims: int  # of the training samples (ACDC trains on 2D slices of 3D volumes)
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]  # foreground classes, index 1..
    default_net: str
    eval_mode: str  # sliding_3d | slices_2d | tiled_2d


SPECS = {
    "la": DatasetSpec("la", 3, 1, 2, ("left atrium",), "vnet", "sliding_3d"),
    "acdc": DatasetSpec("acdc", 2, 1, 4, ("RV", "Myo", "LV"), "unet", "slices_2d"),
    "crag": DatasetSpec("crag", 2, 3, 2, ("gland",), "unet", "tiled_2d"),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown dataset '{name}' (known: {', '.join(SPECS)})") from None
