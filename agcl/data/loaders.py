"""In-memory training sets, evaluation cases and the two-stream batch sampler.

LA and ACDC training sets fit in memory, so they are read once and batches are cut from arrays;
no per-iteration h5 reads and no worker processes (which also keeps runs deterministic).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy import ndimage

from agcl.common.imaging import resize_nearest
from agcl.data import formats
from agcl.data.preprocess import load_index
from agcl.data.specs import SPECS, DatasetSpec
from agcl.runtime.random_streams import numpy_stream


@dataclass
class Case:
    """One evaluation case: image (C, *spatial) float32, label (*spatial) uint8."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    instances: np.ndarray | None = None  # CRAG gland instance map, for object-level metrics


@dataclass
class TrainingSet:
    labeled_images: list[np.ndarray]  # each (C, *spatial)
    labeled_labels: list[np.ndarray]  # each (*spatial)
    unlabeled_images: list[np.ndarray] = field(default_factory=list)
    labeled_ids: list[str] = field(default_factory=list)
    unlabeled_ids: list[str] = field(default_factory=list)


def read_split(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run `agcl splits` first") from None


def _load_volume(processed_dir: Path, item: dict) -> tuple[np.ndarray, np.ndarray]:
    return formats.read_h5_volume(processed_dir / item["file"])


def load_training_set(processed_dir: str | Path, split: dict, ratio_tag: str,
                      patch: list[int]) -> TrainingSet:
    """Labeled and unlabeled training images of one split and label ratio."""
    processed_dir = Path(processed_dir)
    index = load_index(processed_dir)
    if ratio_tag not in split["labeled"]:
        raise KeyError(f"split of seed {split['seed']} has no ratio {ratio_tag} "
                       f"(has {', '.join(split['labeled'])}); rerun `agcl splits`")
    spec = _spec_of(processed_dir, index)
    out = TrainingSet([], [])
    _TRAINING_READERS[spec.layout](processed_dir, index, spec, split, split["labeled"][ratio_tag],
                                   patch, out)
    if not out.labeled_images:
        raise ValueError(f"{processed_dir}: ratio {ratio_tag} of seed {split['seed']} has no labeled image")
    return out


def _spec_of(processed_dir: Path, index: dict) -> DatasetSpec:
    dataset = index["dataset"]
    if dataset not in SPECS:
        raise ValueError(f"{processed_dir}: unknown dataset '{dataset}' in index.json")
    return SPECS[dataset]


# --- one reader per layout of the processed data (DatasetSpec.layout) ---------------------------
def _train_from_volumes(processed_dir: Path, index: dict, spec: DatasetSpec, split: dict,
                        labeled_entry: dict, patch: list[int], out: TrainingSet) -> None:
    """An h5 volume per case (LA): the labeled units and the rest of the pool, whole."""
    labeled = labeled_entry[spec.label_unit + "s"]
    unlabeled = _rest_of_pool(split, labeled)
    for ids, is_labeled in ((labeled, True), (unlabeled, False)):
        for case in ids:
            image, label = _load_volume(processed_dir, index["items"][case])
            _append(out, case, image[None], label if is_labeled else None)


def _train_from_slices(processed_dir: Path, index: dict, spec: DatasetSpec, split: dict,
                       labeled_entry: dict, patch: list[int], out: TrainingSet) -> None:
    """2D training slices in one h5 (ACDC): every slice of a training (not val) frame, resized
    to the patch; labeled where the ratio's entry lists it."""
    val = set(split["val"])
    labeled_slices = set(labeled_entry["slices"])
    train_frames = set(split["train"]) - val
    size = tuple(patch[-2:])
    with h5py.File(processed_dir / index["slices_file"], "r") as h5:
        for name in index["train_slices"]:
            if name.rsplit("_slice_", 1)[0] not in train_frames:
                continue
            image = resize_nearest(_finite(h5, name, "image"), size)
            if name in labeled_slices:
                _append(out, name, image[None], resize_nearest(h5[name]["label"][()], size))
            else:
                _append(out, name, image[None], None)


def _train_from_tiles(processed_dir: Path, index: dict, spec: DatasetSpec, split: dict,
                      labeled_entry: dict, patch: list[int], out: TrainingSet) -> None:
    """Every image a group of one h5 (CRAG): the labeled units and the rest of the pool."""
    labeled = labeled_entry[spec.label_unit + "s"]
    unlabeled = _rest_of_pool(split, labeled)
    with h5py.File(processed_dir / index["data_file"], "r") as h5:
        for ids, is_labeled in ((labeled, True), (unlabeled, False)):
            for name in ids:
                _append(out, name, _finite(h5, name, "image"),
                        h5[name]["label"][()] if is_labeled else None)


def _cases_from_volumes(processed_dir: Path, index: dict, case_ids: list[str]) -> list[Case]:
    """Evaluation cases as h5 volumes, one per case (LA cases, ACDC frames)."""
    cases = []
    for case_id in case_ids:
        image, label = _load_volume(processed_dir, index["items"][case_id])
        cases.append(Case(case_id, image[None].astype(np.float32), label))
    return cases


def _cases_from_tiles(processed_dir: Path, index: dict, case_ids: list[str]) -> list[Case]:
    """Evaluation images from the one h5 file, with their instance maps (CRAG)."""
    cases = []
    with h5py.File(processed_dir / index["data_file"], "r") as h5:
        for case_id in case_ids:
            grp = h5[case_id]
            cases.append(Case(case_id, _finite(h5, case_id, "image"), grp["label"][()],
                              grp["instances"][()]))
    return cases


_TRAINING_READERS = {"volumes": _train_from_volumes, "slices": _train_from_slices,
                     "tiles": _train_from_tiles}
# The slices layout keeps its evaluation cases as whole volumes.
_CASE_READERS = {"volumes": _cases_from_volumes, "slices": _cases_from_volumes,
                 "tiles": _cases_from_tiles}


def _finite(h5: h5py.File, group: str, key: str) -> np.ndarray:
    """One array of a processed h5 file, checked finite (the error names file, group and key)."""
    return formats.check_finite(h5[group][key][()], f"{h5.filename}: {group}/{key}")


def _rest_of_pool(split: dict, labeled: list[str]) -> list[str]:
    """Unlabeled training ids: the labeled pool minus the labeled subset (val is never in it)."""
    chosen = set(labeled)
    return [item for item in split["labeled_pool"] if item not in chosen]


def _append(out: TrainingSet, item_id: str, image: np.ndarray, label: np.ndarray | None) -> None:
    image = np.ascontiguousarray(image, dtype=np.float32)
    if label is None:
        out.unlabeled_images.append(image)
        out.unlabeled_ids.append(item_id)
    else:
        out.labeled_images.append(image)
        out.labeled_labels.append(np.ascontiguousarray(label, dtype=np.uint8))
        out.labeled_ids.append(item_id)


def load_cases(processed_dir: str | Path, case_ids: list[str]) -> list[Case]:
    """Validation or test cases at their original resolution."""
    processed_dir = Path(processed_dir)
    index = load_index(processed_dir)
    return _CASE_READERS[_spec_of(processed_dir, index).layout](processed_dir, index, case_ids)


AUGMENTATIONS = ("rot_flip", "rot_flip_or_rotate", "rot_flip_rotate_or_none")
# The sampler's two streams; each draws from the random stream "<name>_batches".
STREAMS = ("labeled", "unlabeled")
EXTRA_STREAM = "unlabeled_extra"
# SSL4MIS RandomGenerator: np.random.randint(-20, 20) degrees, i.e. -20..19.
ROTATION_DEGREES = (-20, 20)


def default_augmentation(spatial_dims: int) -> str:
    """The references' recipes: LA (UA-MT, MC-Net, BCP) random rot90 + flip of a random crop;
    2D (SSL4MIS RandomGenerator, also used by BCP and MC-Net 2D) per sample rot90 + flip with
    probability 1/2, else a random rotation."""
    return "rot_flip" if spatial_dims == 3 else "rot_flip_or_rotate"


class PatchSampler:
    """Two-stream batches of random patches, augmented per sample as the references do.

    `augmentation`: rot_flip = random rot90 (in the first two spatial axes) + flip; or
    rot_flip_rotate_or_none = SS-Net's RandomGenerator: rot_flip with probability 1/2, a
    rotation with 1/4, nothing with 1/4; rot_flip_or_rotate = SSL4MIS's RandomGenerator: with
    probability 1/2 that, otherwise a rotation by a random integer angle in [-20, 20) degrees (nearest neighbour for image and
    label alike, no reshape, zeros outside: scipy.ndimage.rotate's result, see
    rotation_source_index). Upstream rotates the slice at its native size and then resizes it;
    ACDC slices here are resized once when loaded, then augmented.
    Indices are drawn epoch by epoch from seeded permutations, labeled and unlabeled separately;
    the whole state (RNGs and the rest of the current epochs) is saved with checkpoints.

    Every random draw happens on the host, labeled and unlabeled images from two numpy streams
    of their own ("labeled_batches", "unlabeled_batches", agcl.runtime.random_streams): a method that
    draws no unlabeled batch (supervised) sees the labeled batches of one that does. Cropping, rot90, flips and
    rotations are torch indexing ops on wherever the training set lives: `device` None keeps it
    in host memory; a CUDA device holds it there once, so a batch is cut, augmented and stacked
    on the GPU with no copy from the host. Either way the batches are the same, bit for bit.
    """

    def __init__(self, data: TrainingSet, patch: list[int], labeled_batch: int, unlabeled_batch: int,
                 seed: int, augmentation: str = "rot_flip", device: torch.device | str | None = None,
                 extra_unlabeled: int = 0):
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation: expected one of {', '.join(AUGMENTATIONS)}, "
                             f"got {augmentation!r}")
        self.augmentation = augmentation
        self.patch = tuple(patch)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.labeled_batch = labeled_batch
        self.unlabeled_batch = unlabeled_batch if data.unlabeled_images else 0
        # Padded once to at least the patch (centred, zeros), then held as tensors.
        self.labeled_images = [self._resident(image, 1) for image in data.labeled_images]
        self.labeled_labels = [self._resident(label, 0) for label in data.labeled_labels]
        self.unlabeled_images = ([self._resident(image, 1) for image in data.unlabeled_images]
                                 if self.unlabeled_batch else [])
        # extra unlabeled batches (a method's CutMix sources) come from a stream and an epoch
        # order of their own, so they shift nothing the two main streams draw
        self.extra_unlabeled = extra_unlabeled if self.unlabeled_batch else 0
        streams = STREAMS + ((EXTRA_STREAM,) if self.extra_unlabeled else ())
        self.rngs = {stream: numpy_stream(seed, f"{stream}_batches") for stream in streams}
        self.queues: dict[str, list[int]] = {stream: [] for stream in streams}
        # rot90 keeps the patch shape only when the two rotated axes have equal length.
        self.can_rotate = self.patch[0] == self.patch[1]
        self._rotations: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _resident(self, array: np.ndarray, leading: int) -> torch.Tensor:
        spatial = array.shape[leading:]
        pads = [max(0, p - s) for p, s in zip(self.patch, spatial)]
        if any(pads):
            array = np.pad(array, [(0, 0)] * leading + [(pad // 2, pad - pad // 2) for pad in pads])
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _take(self, stream: str, count: int, pool_size: int) -> list[int]:
        queue = self.queues[stream]
        while len(queue) < count:
            queue.extend(int(i) for i in self.rngs[stream].permutation(pool_size))
        taken, self.queues[stream] = queue[:count], queue[count:]
        return taken

    def _crop(self, rng: np.random.Generator, image: torch.Tensor, label: torch.Tensor | None):
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], self.patch)]
        region = tuple(slice(st, st + p) for st, p in zip(starts, self.patch))
        return image[(slice(None), *region)], (label[region] if label is not None else None)

    def _rotation(self, angle: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source index clamped to the patch, inside mask) of one angle, cached on the device."""
        if angle not in self._rotations:
            index = torch.from_numpy(rotation_source_index(angle, self.patch[:2])).to(self.device)
            self._rotations[angle] = index.clamp(min=0), index >= 0
        return self._rotations[angle]

    def _rotate(self, rng: np.random.Generator, image: torch.Tensor, label: torch.Tensor | None):
        index, inside = self._rotation(int(rng.integers(*ROTATION_DEGREES)))
        # the first two spatial axes rotate; a third (3D patches) goes along unchanged
        inside = inside.view(*inside.shape, *[1] * (image.dim() - 3))
        image = torch.where(inside, image.flatten(1, 2)[:, index], 0)
        if label is not None:
            label = torch.where(inside, label.flatten(0, 1)[index], 0)
        return image, label

    def _augment(self, rng: np.random.Generator, image: torch.Tensor, label: torch.Tensor | None):
        if self.augmentation == "rot_flip_or_rotate" and rng.random() >= 0.5:
            return self._rotate(rng, image, label)
        # SS-Net's RandomGenerator: rot_flip if random() > 0.5, elif random() > 0.5 a rotation,
        # else nothing (1/2, 1/4, 1/4)
        if self.augmentation == "rot_flip_rotate_or_none" and rng.random() >= 0.5:
            if rng.random() >= 0.5:
                return self._rotate(rng, image, label)
            return image, label
        k = int(rng.integers(0, 4)) if self.can_rotate else 0
        axis = int(rng.integers(0, 2))
        image = torch.flip(torch.rot90(image, k, dims=(1, 2)), dims=(axis + 1,))
        if label is not None:
            label = torch.flip(torch.rot90(label, k, dims=(0, 1)), dims=(axis,))
        return image, label

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(labeled images float32, their labels int64, unlabeled images float32 or None), on
        the sampler's device."""
        images, labels = [], []
        rng = self.rngs["labeled"]
        for i in self._take("labeled", self.labeled_batch, len(self.labeled_images)):
            image, label = self._augment(rng, *self._crop(rng, self.labeled_images[i],
                                                          self.labeled_labels[i]))
            images.append(image)
            labels.append(label)
        unlabeled = self._unlabeled_batch("unlabeled") if self.unlabeled_batch else None
        return torch.stack(images), torch.stack(labels).long(), unlabeled

    def _unlabeled_batch(self, stream: str) -> torch.Tensor:
        """One batch of unlabeled patches, drawn, cropped and augmented from `stream`."""
        rng = self.rngs[stream]
        picks = self._take(stream, self.unlabeled_batch, len(self.unlabeled_images))
        return torch.stack([self._augment(rng, *self._crop(rng, self.unlabeled_images[i], None))[0]
                            for i in picks])

    def next_extra_unlabeled(self) -> list[torch.Tensor]:
        """The extra unlabeled batches of this step (Method.extra_unlabeled_batches of them, each
        of the unlabeled batch size), drawn and augmented as the unlabeled batch."""
        return [self._unlabeled_batch(EXTRA_STREAM) for _ in range(self.extra_unlabeled)]

    def state_dict(self) -> dict:
        return {"rngs": {k: rng.bit_generator.state for k, rng in self.rngs.items()},
                "queues": {k: list(v) for k, v in self.queues.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state.get("rngs", ())) != set(self.rngs):
            raise ValueError(f"sampler state: expected the RNG states of the streams "
                             f"{', '.join(self.rngs)}, got keys {', '.join(map(str, state))} "
                             "(a checkpoint of an older version?)")
        for stream, rng_state in state["rngs"].items():
            self.rngs[stream].bit_generator.state = rng_state
        self.queues = {k: list(v) for k, v in state["queues"].items()}


@functools.cache
def rotation_source_index(angle: int, shape: tuple[int, int]) -> np.ndarray:
    """For an (H, W) patch rotated by `angle` degrees as scipy.ndimage.rotate(axes=(1, 0),
    order=0, reshape=False) does it, the flat index of the source pixel each output pixel takes,
    or -1 where scipy fills zeros. Rotating the image of pixel indices with scipy itself makes
    the gather exactly scipy's nearest-neighbour result, on any device."""
    grid = np.arange(shape[0] * shape[1], dtype=np.float64).reshape(shape)
    rotated = ndimage.rotate(grid, angle, axes=(1, 0), order=0, reshape=False, mode="constant",
                             cval=-1.0)
    return rotated.astype(np.int64)


def training_set_bytes(data: TrainingSet, unlabeled: bool = True) -> int:
    """Bytes of the arrays a sampler holds (what keeping them on a GPU costs, before padding);
    a method that draws no unlabeled batch holds only the labeled ones."""
    arrays = [*data.labeled_images, *data.labeled_labels, *(data.unlabeled_images if unlabeled else [])]
    return sum(a.nbytes for a in arrays)
