"""Ingest a user-supplied CRAG zip or folder into the canonical layout that preprocessing reads.

CRAG has no stable download URL or checksum, so the copy is verified by pairing and counting:
  dest/{train,test}/images/<stem>.png     RGB, bytes copied unchanged (RGBA: alpha dropped)
  dest/{train,test}/instances/<stem>.png  single-channel instance map, bytes copied unchanged
  dest/ingest.json                        counts, sha256 per file, source variant, ignored files
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from agcl.common.utils import code_version, write_json
from agcl.data.formats import natural_key

LOGGER = logging.getLogger("agcl.crag")

TEST_SPLIT_FOLDERS = ("valid", "test")
ANNOTATION_FOLDERS = ("Annotation", "Annotations")
IMAGE_FOLDER = "Images"
# Pillow modes of a single-channel integer image; "P" keeps the stored indices as the ids.
_INSTANCE_MODES = frozenset({"L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_JUNK_PREFIXES = ("__MACOSX/",)
# Largest file accepted from the source. CRAG's images are 1512x1516 RGB PNGs (a few MB each);
# the cap stops a malformed or hostile zip (a small archive declaring a huge member) from being
# read into memory. Checked on the declared sizes before anything is read, and again while reading.
MAX_MEMBER_BYTES = 64 * 2**20
# CRAG's images are about 1512 x 1516 (2.3 megapixels); 25 megapixels leaves room for any
# rescan while refusing a file that would take gigabytes to preprocess (Pillow's own bomb limit
# is 89 megapixels, 179 before it refuses).
MAX_IMAGE_PIXELS = 25_000_000
_CHUNK = 2**20


class CragIngestError(ValueError):
    """The supplied CRAG copy is incomplete or not what the harness expects."""


class _Source:
    """Read-only view of a zip or a folder as posix relative paths -> bytes."""

    def __init__(self, src: Path, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.path = src
        self.max_member_bytes = max_member_bytes
        if src.is_dir():
            self.kind = "folder"
            self._zip = None
            self.files = sorted(
                p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()
            )
        elif src.is_file() and zipfile.is_zipfile(src):
            self.kind = "zip"
            self._zip = zipfile.ZipFile(src)
            self.files = sorted(
                info.filename.replace("\\", "/") for info in self._zip.infolist()
                if not info.is_dir()
            )
            self._zip_names = {info.filename.replace("\\", "/"): info.filename
                               for info in self._zip.infolist()}
            seen, twice = set(), []
            for name in self.files:
                if name in seen:
                    twice.append(name)
                seen.add(name)
            if twice:
                self.close()
                raise CragIngestError(
                    f"{src}: the zip holds {len(twice)} member name(s) more than once (e.g. "
                    f"{twice[0]}): which copy is the image is ambiguous; repack it with each "
                    "file once")
        elif src.exists():
            raise CragIngestError(f"CRAG source {src} is neither a folder nor a readable .zip")
        else:
            raise CragIngestError(f"CRAG source {src} does not exist")
        self.files = [f for f in self.files if not _is_junk(f)]
        try:
            self._check_declared_sizes()
        except CragIngestError:
            self.close()
            raise

    def _declared_size(self, relpath: str) -> int:
        if self._zip is not None:
            return self._zip.getinfo(self._zip_names[relpath]).file_size
        return (self.path / relpath).stat().st_size

    def _too_large(self, relpath: str, size: str) -> CragIngestError:
        return CragIngestError(
            f"CRAG: {self.describe(relpath)} is {size} (the cap is "
            f"{self.max_member_bytes / 2**20:g} MiB per file; a CRAG image is a few MB): "
            "not a CRAG file, or a damaged archive")

    def _check_declared_sizes(self) -> None:
        for relpath in self.files:
            size = self._declared_size(relpath)
            if size > self.max_member_bytes:
                raise self._too_large(relpath, f"{size / 2**20:.1f} MiB")

    def read(self, relpath: str) -> bytes:
        """The file's bytes, read in chunks and never more than the cap."""
        chunks, total = [], 0
        with (self._zip.open(self._zip_names[relpath]) if self._zip is not None
              else open(self.path / relpath, "rb")) as handle:
            while chunk := handle.read(_CHUNK):
                total += len(chunk)
                if total > self.max_member_bytes:
                    raise self._too_large(relpath, "larger than declared")
                chunks.append(chunk)
        return b"".join(chunks)

    def describe(self, relpath: str) -> str:
        return f"{self.path}:{relpath}" if self.kind == "zip" else str(self.path / relpath)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _is_junk(relpath: str) -> bool:
    # Zips made on macOS carry resource forks and Finder files beside the data.
    name = PurePosixPath(relpath).name
    return relpath.startswith(_JUNK_PREFIXES) or name.startswith("._") or name == ".DS_Store"


def _children(files: list[str], folder: str) -> set[str]:
    """Names of the immediate sub-folders of `folder` ("" = root)."""
    prefix = f"{folder}/" if folder else ""
    return {f[len(prefix):].split("/")[0] for f in files
            if f.startswith(prefix) and "/" in f[len(prefix):]}


def _pick_one(options: tuple[str, ...], present: set[str], what: str, where: str) -> str:
    found = [name for name in options if name in present]
    if not found:
        raise CragIngestError(
            f"CRAG: no {what} folder in {where}: expected one of {'|'.join(options)}, "
            f"found {sorted(present) or 'nothing'}"
        )
    if len(found) > 1:
        raise CragIngestError(
            f"CRAG: both {' and '.join(found)} in {where}; keep only one {what} folder"
        )
    return found[0]


def _find_root(source: _Source) -> str:
    """The folder holding train/ and valid|test/: the top level, CRAG/, or one single top folder."""
    top = _children(source.files, "")
    if "train" in top:
        return ""
    candidates = ["CRAG"] if "CRAG" in top else sorted(top) if len(top) == 1 else []
    for candidate in candidates:
        if "train" in _children(source.files, candidate):
            return candidate
    raise CragIngestError(
        f"CRAG: missing split folder 'train' in {source.path}: expected train/ and valid/ "
        f"(or test/), at the top level or inside CRAG/; found top-level folders "
        f"{sorted(top) or 'none'}"
    )


@dataclass
class _SplitPairs:
    split: str  # output split: train | test
    folder: str  # source folder name: train | valid | test
    annotation_folder: str
    pairs: dict[str, tuple[str, str]]  # stem -> (image relpath, annotation relpath)
    ignored_annotations: list[str]
    ignored_files: list[str]


def _pair_split(source: _Source, root: str, split: str, folder: str, expected: int) -> _SplitPairs:
    base = f"{root}/{folder}" if root else folder
    where = source.describe(base)
    subfolders = _children(source.files, base)
    if IMAGE_FOLDER not in subfolders:
        raise CragIngestError(
            f"CRAG {split}: missing folder {IMAGE_FOLDER}/ in {where} "
            f"(found {sorted(subfolders) or 'nothing'})"
        )
    annotation_folder = _pick_one(ANNOTATION_FOLDERS, subfolders, "annotation", where)

    def pngs(sub: str) -> tuple[dict[str, str], list[str]]:
        prefix = f"{base}/{sub}/"
        by_stem, others = {}, []
        for relpath in source.files:
            if relpath.startswith(prefix) and "/" not in relpath[len(prefix):]:
                name = PurePosixPath(relpath)
                if name.suffix.lower() == ".png":
                    by_stem[name.stem] = relpath
                else:
                    others.append(relpath)
        return by_stem, others

    images, other_images = pngs(IMAGE_FOLDER)
    annotations, other_annotations = pngs(annotation_folder)
    missing = sorted((stem for stem in images if stem not in annotations), key=natural_key)
    unpaired = sorted((stem for stem in annotations if stem not in images), key=natural_key)
    problems = []
    if len(images) != expected:
        problems.append(f"expected {expected} {split} images, found {len(images)}")
        if unpaired and len(images) < expected:
            # An annotation without its image usually means the image itself is what is missing.
            names = ", ".join(f"{s}.png" for s in unpaired)
            problems.append(f"missing image(s) {names} in "
                            f"{source.describe(f'{base}/{IMAGE_FOLDER}')} (their annotation(s) "
                            f"{', '.join(annotations[s] for s in unpaired)} have no image)")
    if missing:
        names = ", ".join(PurePosixPath(images[s]).name for s in missing)
        problems.append(f"missing annotation for {names} "
                        f"(looked in {source.describe(f'{base}/{annotation_folder}')})")
    if problems:
        raise CragIngestError(f"CRAG {split} ({where}): " + "; ".join(problems))
    ignored = sorted((annotations[s] for s in unpaired), key=natural_key)
    pairs = {stem: (images[stem], annotations[stem]) for stem in sorted(images, key=natural_key)}
    return _SplitPairs(split, folder, annotation_folder, pairs, ignored,
                       sorted(other_images + other_annotations))


def _open_png(data: bytes, label: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # from the header, before decoding
        if width * height > MAX_IMAGE_PIXELS:
            raise CragIngestError(
                f"CRAG: {label} is {width} x {height} = {width * height / 1e6:.0f} megapixels; "
                f"expected at most {MAX_IMAGE_PIXELS / 1e6:.0f} (CRAG's images are about 1512 x "
                "1516): not a CRAG image")
        image.load()  # decode fully so a truncated file fails here, not in preprocessing
    except UnidentifiedImageError:
        raise CragIngestError(f"CRAG: {label} is not an image Pillow can read (expected a PNG "
                              "file)") from None
    except CragIngestError:
        raise
    except Exception as error:  # Pillow raises many types for broken files
        raise CragIngestError(f"CRAG: cannot read PNG {label}: {error}") from error
    if image.format != "PNG":
        raise CragIngestError(f"CRAG: {label} is {image.format}, expected a PNG file")
    return image


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_bytes(source: _Source, relpath: str, notes: list[str]) -> tuple[bytes, tuple[int, int]]:
    """Bytes to write for an image (unchanged unless RGBA) and its (H, W)."""
    data = source.read(relpath)
    label = source.describe(relpath)
    image = _open_png(data, label)
    size = (image.height, image.width)
    if image.mode == "RGB":
        return data, size
    if image.mode == "RGBA":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        notes.append(relpath)
        LOGGER.warning("CRAG: %s is RGBA; alpha channel dropped", label)
        return buffer.getvalue(), size
    raise CragIngestError(f"CRAG: image {label} has mode {image.mode}, expected RGB (or RGBA)")


def _check_annotation(source: _Source, relpath: str, image_size: tuple[int, int],
                      image_relpath: str) -> bytes:
    data = source.read(relpath)
    label = source.describe(relpath)
    annotation = _open_png(data, label)
    if annotation.mode not in _INSTANCE_MODES:
        raise CragIngestError(
            f"CRAG: annotation {label} has mode {annotation.mode}, expected a single-channel "
            f"integer instance map (one of {', '.join(sorted(_INSTANCE_MODES))})"
        )
    size = (annotation.height, annotation.width)
    if size != image_size:
        raise CragIngestError(
            f"CRAG: annotation {label} is {size[0]}x{size[1]} (HxW) but its image "
            f"{source.describe(image_relpath)} is {image_size[0]}x{image_size[1]}"
        )
    return data


def _source_hashes(source: _Source, splits: list[_SplitPairs]) -> dict[str, str]:
    """dest relpath -> sha256 of the source bytes it comes from."""
    hashes = {}
    for pairs in splits:
        for stem, (image, annotation) in pairs.pairs.items():
            hashes[f"{pairs.split}/images/{stem}.png"] = _sha256(source.read(image))
            hashes[f"{pairs.split}/instances/{stem}.png"] = _sha256(source.read(annotation))
    return hashes


def _existing_matches(dest: Path, source_hashes: dict[str, str]) -> dict | None:
    """The previous ingest.json when dest already holds exactly this source's files, else None."""
    manifest_path = dest / "ingest.json"
    if not manifest_path.is_file():
        return None
    try:
        previous = json.loads(manifest_path.read_text())
        recorded = previous["files"]
        if {k: v["source_sha256"] for k, v in recorded.items()} != source_hashes:
            return None
        for relpath, entry in recorded.items():
            local = dest / relpath
            if not local.is_file() or _sha256(local.read_bytes()) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return previous


def ingest_crag(src: str | os.PathLike, dest: str | os.PathLike, expected_train: int = 173,
                expected_test: int = 40, max_member_bytes: int = MAX_MEMBER_BYTES) -> dict:
    """Verify a CRAG zip/folder and copy it into `dest` (canonical layout); return ingest.json.

    Nothing is written unless every file pairs, counts and decodes; if dest already holds the
    same files (same hashes) it is left untouched and its ingest.json is returned.
    """
    src, dest = Path(src).resolve(), Path(dest).resolve()
    source = _Source(src, max_member_bytes)
    try:
        root = _find_root(source)
        root_children = _children(source.files, root)
        test_folder = _pick_one(TEST_SPLIT_FOLDERS, root_children, "test split",
                                source.describe(root) if root else str(src))
        splits = [
            _pair_split(source, root, "train", "train", expected_train),
            _pair_split(source, root, "test", test_folder, expected_test),
        ]
        source_hashes = _source_hashes(source, splits)
        previous = _existing_matches(dest, source_hashes)
        if previous is not None:
            LOGGER.info("CRAG: %s already holds this source (%s); nothing to do", dest, src)
            return previous
        if dest.exists() and not (dest / "ingest.json").is_file() and any(dest.iterdir()):
            raise CragIngestError(
                f"CRAG: destination {dest} exists, is not empty and has no ingest.json; "
                f"refusing to replace it (remove it or pick another folder)"
            )
        summary = _write_tree(source, splits, dest, root, source_hashes)
    finally:
        source.close()
    LOGGER.info("CRAG: ingested %d train + %d test images into %s",
                summary["counts"]["train"], summary["counts"]["test"], dest)
    return summary


def _write_tree(source: _Source, splits: list[_SplitPairs], dest: Path, root: str,
                source_hashes: dict[str, str]) -> dict:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        files: dict[str, dict[str, Any]] = {}
        converted: list[str] = []
        for pairs in splits:
            for sub in ("images", "instances"):
                (staging / pairs.split / sub).mkdir(parents=True)
            for stem, (image_rel, annotation_rel) in pairs.pairs.items():
                image_data, size = _image_bytes(source, image_rel, converted)
                annotation_data = _check_annotation(source, annotation_rel, size, image_rel)
                for sub, rel, data in (("images", image_rel, image_data),
                                       ("instances", annotation_rel, annotation_data)):
                    out = f"{pairs.split}/{sub}/{stem}.png"
                    (staging / out).write_bytes(data)
                    files[out] = {"sha256": _sha256(data), "source": rel,
                                  "source_sha256": source_hashes[out],
                                  "height": size[0], "width": size[1]}
        summary = {
            "dataset": "CRAG",
            "source": {
                "path": str(source.path),
                "kind": source.kind,
                "root_folder": root,
                "split_folders": {p.split: p.folder for p in splits},
                "annotation_folders": {p.split: p.annotation_folder for p in splits},
            },
            "counts": {p.split: len(p.pairs) for p in splits},
            "ignored_annotations": [a for p in splits for a in p.ignored_annotations],
            "ignored_files": [f for p in splits for f in p.ignored_files],
            "rgba_converted": converted,
            "files": files,
            "code_version": code_version(),
        }
        write_json(staging / "ingest.json", summary)
        _swap_into_place(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return summary


def _swap_into_place(staging: Path, dest: Path) -> None:
    """Rename staging onto dest; a previous dest is moved aside first and dropped afterwards."""
    if not dest.exists():
        os.replace(staging, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
    old.rmdir()
    os.replace(dest, old)
    try:
        os.replace(staging, dest)
    except OSError:
        os.replace(old, dest)
        raise
    shutil.rmtree(old)
