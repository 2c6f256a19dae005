"""Turn a dataset folder (downloaded, ingested or synthetic) into the processed form training reads.

- LA: the processed upstream h5 files are used as they are; we check them and write an index.
- ACDC: volumes -> 2D training slices (one h5, native size); test/val volumes stay as they are.
- CRAG: PNG pairs -> normalised float arrays at the configured scale, semantic mask (id > 0) and the
  instance map kept for object-level metrics.
Every processed folder holds index.json: the upstream lists restricted to the cases present, the
file of every item and the facts later stages record with results (resolution, scale).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from agcl.common.utils import atomic_path, write_json
from agcl.data import formats
from agcl.data.specs import SPECS

log = logging.getLogger("agcl.preprocess")

# Stain statistics of CRAG used by the semi-supervised gland repos (docs/paper-notes.md), kept
# on its DatasetSpec.
CRAG_MEAN = np.array(SPECS["crag"].channel_mean, dtype=np.float32)
CRAG_STD = np.array(SPECS["crag"].channel_std, dtype=np.float32)


class PreprocessError(ValueError):
    pass


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def _check_disjoint(src: Path, lists: dict[str, list[str]]) -> None:
    """A case in two of the lists (train and test, say) would be trained on and scored."""
    names = list(lists)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            both = sorted(set(lists[first]) & set(lists[second]))
            if both:
                raise PreprocessError(
                    f"{src}: {len(both)} case(s) in both {first}.list and {second}.list (e.g. "
                    f"{both[0]}): a case is trained on or scored, never both; fix the lists")


def _check_not_empty(path: Path, image: np.ndarray) -> None:
    if 0 in image.shape:
        raise PreprocessError(f"{path}: field 'image' has shape {list(image.shape)}: an empty "
                              "axis (0 slices?); expected a volume with every axis > 0")


def preprocess_la(src: Path, out: Path) -> dict:
    train, test = (formats.read_list(src / f"{s}.list") for s in ("train", "test"))
    _check_disjoint(src, {"train": train, "test": test})
    items, missing = {}, []
    for case in train + test:
        path = formats.la_case_path(src, case)
        if not path.exists():
            missing.append(case)
            continue
        image, _ = formats.read_h5_volume(path, label_values={0, 1})
        _check_not_empty(path, image)
        items[case] = {"file": _rel(path, out), "shape": list(image.shape)}
    if not items:
        raise PreprocessError(f"{src}: none of the {len(train + test)} LA cases of the lists is present")
    index = {
        "dataset": "la",
        "lists": {"train": [c for c in train if c in items], "test": [c for c in test if c in items]},
        "upstream_counts": {"train": len(train), "test": len(test)},
        "missing": missing,
        "items": items,
        "resolution": "upstream processed volumes (cropped around the atrium), voxels",
    }
    return index


def preprocess_acdc(src: Path, out: Path) -> dict:
    lists = {s: formats.read_list(src / f"{s}.list") for s in ("train", "val", "test")}
    _check_disjoint(src, lists)
    slice_names = formats.read_list(src / "train_slices.list")
    frame_files = formats.acdc_frame_files(src)
    items, missing = {}, []
    for split in ("train", "val", "test"):
        for frame in lists[split]:
            if frame not in frame_files:
                missing.append(frame)
                continue
            path = frame_files[frame]
            items[frame] = {"file": _rel(path, out), "patient": frame.split("_")[0]}
    if not items:
        raise PreprocessError(f"{src}: no ACDC volume of the lists is present")

    slices_file = out / "train_slices.h5"
    present_slices = []
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with atomic_path(slices_file) as tmp, h5py.File(tmp, "w") as h5:
        for name in slice_names:
            frame, number = formats.parse_slice_name(name)
            if frame not in items:
                continue
            if frame not in volumes:
                volumes[frame] = formats.read_h5_volume(frame_files[frame], label_values={0, 1, 2, 3})
                _check_not_empty(frame_files[frame], volumes[frame][0])
            image, label = volumes[frame]
            if not 1 <= number <= image.shape[0]:
                raise PreprocessError(
                    f"{src / 'train_slices.list'}: {name} asks for slice {number} but "
                    f"{frame_files[frame]} has {image.shape[0]} slices"
                )
            grp = h5.create_group(name)
            grp.create_dataset("image", data=image[number - 1])
            grp.create_dataset("label", data=label[number - 1])
            present_slices.append(name)
    for frame, (image, _) in volumes.items():
        items[frame]["shape"] = list(image.shape)
    # Val and test volumes are read by evaluation, not here; checking them now names a broken
    # file before any training, and their shapes size the predictions (agcl plan).
    for frame, item in items.items():
        if "shape" not in item:
            image, _ = formats.read_h5_volume(frame_files[frame], label_values={0, 1, 2, 3})
            _check_not_empty(frame_files[frame], image)
            item["shape"] = list(image.shape)
    return {
        "dataset": "acdc",
        "lists": {s: [f for f in v if f in items] for s, v in lists.items()},
        "upstream_counts": {s: len(v) for s, v in lists.items()},
        "train_slices": present_slices,
        "slices_file": slices_file.name,
        "missing": missing,
        "items": items,
        "resolution": "slices resized to the network input for training and inference; "
        "metrics on the original volume grid, voxels",
    }


def preprocess_crag(src: Path, out: Path, scale: float = 1.0) -> dict:
    """src is an ingested CRAG folder (agcl ingest-crag): {train,test}/{images,instances}/*.png."""
    data_file = out / "crag.h5"
    items, lists = {}, {"train": [], "test": []}
    with atomic_path(data_file) as tmp, h5py.File(tmp, "w") as h5:
        for split in ("train", "test"):
            image_dir = src / split / "images"
            if not image_dir.is_dir():
                raise PreprocessError(f"{src}: expected folder {split}/images (run agcl ingest-crag first)")
            images = sorted(image_dir.glob("*.png"), key=lambda p: formats.natural_key(p.name))
            for image_path in images:
                rgb, instances = formats.read_crag_pair(
                    image_path, src / split / "instances" / image_path.name
                )
                rgb, instances = _rescale(rgb, instances, scale)
                normalised = (rgb.astype(np.float32) / 255.0 - CRAG_MEAN) / CRAG_STD
                grp = h5.create_group(image_path.stem)
                grp.create_dataset("image", data=normalised.transpose(2, 0, 1), compression="gzip")
                grp.create_dataset("label", data=(instances > 0).astype(np.uint8), compression="gzip")
                grp.create_dataset("instances", data=instances, compression="gzip")
                lists[split].append(image_path.stem)
                items[image_path.stem] = {"shape": list(instances.shape), "split": split}
    if not lists["train"] or not lists["test"]:
        raise PreprocessError(f"{src}: CRAG needs train and test images, found {len(lists['train'])}"
                              f" and {len(lists['test'])}")
    return {
        "dataset": "crag",
        "lists": lists,
        "upstream_counts": {s: len(v) for s, v in lists.items()},
        "data_file": data_file.name,
        "scale": scale,
        "missing": [],
        "items": items,
        "resolution": f"images resampled by {scale:g} of the original pixel grid; pixels",
    }


def _rescale(rgb: np.ndarray, instances: np.ndarray, scale: float):
    if scale == 1.0:
        return rgb, instances
    h, w = instances.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    inst = np.asarray(Image.fromarray(instances.astype(np.int32)).resize(size, Image.NEAREST))
    return rgb, inst.astype(np.int32)


# The reader of each upstream format (DatasetSpec.source_format), called (src, out, scale): a
# dataset folder -> the processed folder's index (only the CRAG images are resampled).
PREPROCESSORS = {
    "ua_mt_la": lambda src, out, scale: preprocess_la(src, out),
    "ssl4mis_acdc": lambda src, out, scale: preprocess_acdc(src, out),
    "crag_png": preprocess_crag,
}


def preprocess(dataset: str, src: str | Path, out: str | Path, scale: float = 1.0) -> dict:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PreprocessError(f"dataset folder {src} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    if dataset not in SPECS:
        *rest, last = SPECS
        raise PreprocessError(f"unknown dataset '{dataset}' (expected {', '.join(rest)} or {last})")
    index = PREPROCESSORS[SPECS[dataset].source_format](src, out, scale)
    index["dataset"] = dataset  # a reader may serve several datasets of one upstream format
    if index["missing"]:
        log.warning("%s: %d listed cases are absent (restricted download?): %s", dataset,
                    len(index["missing"]), ", ".join(index["missing"][:5]))
    index["content_sha256"] = content_digest(out, index)
    write_json(out / "index.json", index)
    return index


def content_digest(out: Path, index: dict) -> str:
    """sha256 over every file the index points to (each case's file, the slice or data file),
    names included: the run identity's data hash, so a run never resumes on other data."""
    names = {item["file"] for item in index["items"].values() if "file" in item}
    names |= {index[key] for key in ("slices_file", "data_file") if index.get(key)}
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        with open(out / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_index(processed_dir: str | Path) -> dict:
    path = Path(processed_dir) / "index.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PreprocessError(f"{path} is missing: run `agcl preprocess` first") from None
