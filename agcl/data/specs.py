"""Fixed facts of each dataset: dimensionality, channels, classes, default network, eval mode, and
what the data layer does differently per dataset, named as facts (how the processed data lie on
disk, what a labeled subset counts, where val comes from, ...).

Code that behaves differently per dataset reads these fields (or looks up a function by one of
them: agcl.data.preprocess by `source_format`, agcl.data.loaders by `layout`, agcl.data.download
by `source_format`) instead of testing the dataset's name, so a new dataset is one entry here plus
its own reader functions. Plain dataclasses only: importable without torch or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

# How the processed data lie on disk (agcl.data.preprocess writes them, agcl.data.loaders reads
# them): one h5 volume per case; 2D training slices in one h5 plus an h5 volume per evaluation
# case; every image (tile) as a group of one h5 file.
LAYOUTS = ("volumes", "slices", "tiles")
# Where the val set comes from: the upstream val list, or the last val_cases units of the
# upstream train order (carved before any permutation).
VAL_FROM = ("upstream_list", "train_tail")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    spatial_dims: int  # of the training samples (ACDC trains on 2D slices of 3D volumes)
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]  # foreground classes, index 1..
    default_net: str
    eval_mode: str  # sliding_3d | slices_2d | tiled_2d
    # The upstream format `agcl preprocess` reads (agcl.data.preprocess.PREPROCESSORS) and, for a
    # downloadable dataset, the upstream repository layout (agcl.data.download).
    source_format: str
    layout: str  # of the processed data, one of LAYOUTS (agcl.data.loaders' readers)
    label_unit: str  # what a labeled subset counts and chooses: case | patient | image
    val_from: str  # one of VAL_FROM
    # The axis of a 3D case a figure draws its sample slice along (the one with the most
    # foreground); None: a case is one 2D image, drawn whole.
    display_axis: int | None
    # What a labeling unit groups, where it is more than one item: "frame" (an ACDC patient's
    # frames, ids "<patient>_frameNN", are labeled together). None: a unit is one item.
    unit_items: str | None = None
    # Per-channel mean and std the processed images were normalised with (a figure undoes it);
    # None: images are drawn as stored.
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None
    spacing_mm: tuple[float, ...] | None = None  # physical voxel size, where the files allow one
    # The bounds of the processed images where preprocessing gives them (docs/data.md: ACDC's
    # min-max [0, 1]); None: unbounded (z-scored, stain-normalised). A photometric augmentation
    # clips to it (agcl.methods.augment's `clamp`), as ColorJitter clips an 8-bit image.
    intensity_range: tuple[float, float] | None = None
    manifests: tuple[str, ...] = ()  # sha256 manifests of a checksummed download; () for none
    synth_zip: bool = False  # `agcl synth --zip` writes the dataset as its download's zip

    def __post_init__(self):
        for field, value, allowed in (("layout", self.layout, LAYOUTS),
                                      ("val_from", self.val_from, VAL_FROM)):
            if value not in allowed:
                raise ValueError(f"dataset {self.name}: {field} must be one of "
                                 f"{', '.join(allowed)}, got {value!r}")


SPECS = {
    "la": DatasetSpec("la", 3, 1, 2, ("left atrium",), "vnet", "sliding_3d",
                      source_format="ua_mt_la", layout="volumes", label_unit="case",
                      val_from="train_tail", display_axis=2,  # LA volumes are (X, Y, Z)
                      spacing_mm=(0.625, 0.625, 0.625),  # LA is 0.625 mm isotropic
                      manifests=("LA.sha256",)),
    "acdc": DatasetSpec("acdc", 2, 1, 4, ("RV", "Myo", "LV"), "unet", "slices_2d",
                        source_format="ssl4mis_acdc", layout="slices", label_unit="patient",
                        val_from="upstream_list", display_axis=0,  # ACDC volumes are (S, H, W)
                        unit_items="frame", intensity_range=(0.0, 1.0),
                        manifests=("ACDC_lists.sha256", "ACDC_volumes.sha256")),
    "crag": DatasetSpec("crag", 2, 3, 2, ("gland",), "unet", "tiled_2d",
                        source_format="crag_png", layout="tiles", label_unit="image",
                        val_from="train_tail", display_axis=None,
                        # stain statistics of CRAG used by the semi-supervised gland repos
                        # (docs/paper-notes.md)
                        channel_mean=(0.8307, 0.7224, 0.8573),
                        channel_std=(0.1200, 0.1523, 0.0914),
                        synth_zip=True),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown dataset '{name}' (known: {', '.join(SPECS)})") from None
