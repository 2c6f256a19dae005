"""CRAG ingest on tiny hand-built CRAG-like zips and folders."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agcl.data.crag_ingest import CragIngestError, ingest_crag

H, W = 20, 24


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def make_crag(root: Path, n_train: int = 3, n_test: int = 2, test_folder: str = "valid",
              annotation_folder: str = "Annotation", top: str = "CRAG") -> Path:
    """Write a CRAG-like tree under root[/top]; returns the split parent folder."""
    rng = np.random.default_rng(0)
    base = root / top if top else root
    for folder, prefix, count in (("train", "train", n_train), (test_folder, "test", n_test)):
        for i in range(1, count + 1):
            name = f"{prefix}_{i}.png"
            save_png(base / folder / "Images" / name,
                     rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            instances = np.zeros((H, W), np.uint8)
            instances[2:8, 3:9], instances[10:18, 12:20] = 1, 2
            save_png(base / folder / annotation_folder / name, instances)
            save_png(base / folder / "Overlay" / name, np.zeros((H, W, 3), np.uint8))
    return base


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    return zip_path


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def expected_tree(n_train: int, n_test: int) -> set[str]:
    files = {"ingest.json"}
    for split, prefix, count in (("train", "train", n_train), ("test", "test", n_test)):
        for i in range(1, count + 1):
            files |= {f"{split}/images/{prefix}_{i}.png", f"{split}/instances/{prefix}_{i}.png"}
    return files


def test_v2_zip_layout(tmp_path):
    make_crag(tmp_path / "raw")
    archive = zip_folder(tmp_path / "raw", tmp_path / "CRAG.zip")
    dest = tmp_path / "out" / "crag"
    summary = ingest_crag(archive, dest, expected_train=3, expected_test=2)

    assert tree(dest) == expected_tree(3, 2)
    source_image = tmp_path / "raw/CRAG/valid/Images/test_2.png"
    assert (dest / "test/images/test_2.png").read_bytes() == source_image.read_bytes()
    assert (dest / "train/instances/train_3.png").read_bytes() == (
        tmp_path / "raw/CRAG/train/Annotation/train_3.png").read_bytes()
    assert summary["counts"] == {"train": 3, "test": 2}
    assert summary["source"]["kind"] == "zip"
    assert summary["source"]["root_folder"] == "CRAG"
    assert summary["source"]["split_folders"] == {"train": "train", "test": "valid"}
    entry = summary["files"]["test/images/test_2.png"]
    assert entry["sha256"] == hashlib.sha256(source_image.read_bytes()).hexdigest()
    assert (entry["height"], entry["width"]) == (H, W)
    assert summary["ignored_annotations"] == [] and summary["rgba_converted"] == []
    assert json.loads((dest / "ingest.json").read_text()) == summary


def test_readme_layout_folder_without_top_level(tmp_path):
    src = make_crag(tmp_path / "raw", test_folder="test", annotation_folder="Annotations", top="")
    summary = ingest_crag(src, tmp_path / "crag", expected_train=3, expected_test=2)
    assert tree(tmp_path / "crag") == expected_tree(3, 2)
    assert summary["source"]["kind"] == "folder"
    assert summary["source"]["root_folder"] == ""
    assert summary["source"]["split_folders"]["test"] == "test"
    assert summary["source"]["annotation_folders"] == {"train": "Annotations",
                                                       "test": "Annotations"}


def test_extra_annotation_is_ignored_and_reported(tmp_path):
    base = make_crag(tmp_path / "raw")
    save_png(base / "valid/Annotation/test_41.png", np.zeros((H, W), np.uint8))
    summary = ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=3, expected_test=2)
    assert summary["ignored_annotations"] == ["CRAG/valid/Annotation/test_41.png"]
    assert not (tmp_path / "crag/test/instances/test_41.png").exists()


def test_missing_annotation_is_named(tmp_path):
    base = make_crag(tmp_path / "raw")
    (base / "train/Annotation/train_2.png").unlink()
    with pytest.raises(CragIngestError,
                       match=r"CRAG train .*missing annotation for train_2\.png"):
        ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=3, expected_test=2)
    assert not (tmp_path / "crag").exists()


def test_wrong_count_gives_both_numbers(tmp_path):
    make_crag(tmp_path / "raw", n_train=3)
    with pytest.raises(CragIngestError, match="expected 4 train images, found 3"):
        ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=4, expected_test=2)


def test_missing_split_folder_is_named(tmp_path):
    make_crag(tmp_path / "raw", n_test=0)
    with pytest.raises(CragIngestError, match=r"no test split folder .*expected one of valid\|test"):
        ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=3, expected_test=0)


def test_size_mismatch_names_file_and_both_sizes(tmp_path):
    base = make_crag(tmp_path / "raw")
    save_png(base / "valid/Annotation/test_1.png", np.zeros((H, W - 1), np.uint8))
    with pytest.raises(CragIngestError,
                       match=rf"Annotation/test_1\.png is {H}x{W - 1} \(HxW\).*is {H}x{W}"):
        ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=3, expected_test=2)


def test_rgb_annotation_is_rejected(tmp_path):
    base = make_crag(tmp_path / "raw")
    save_png(base / "train/Annotation/train_1.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(CragIngestError, match=r"train_1\.png has mode RGB, expected a single"):
        ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=3, expected_test=2)


def test_rgba_image_loses_alpha_and_says_so(tmp_path):
    base = make_crag(tmp_path / "raw")
    rgba = np.full((H, W, 4), 200, np.uint8)
    save_png(base / "train/Images/train_1.png", rgba)
    summary = ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=3, expected_test=2)
    assert summary["rgba_converted"] == ["CRAG/train/Images/train_1.png"]
    with Image.open(tmp_path / "crag/train/images/train_1.png") as image:
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 200, 200)


def test_failure_late_in_copy_leaves_no_dest_and_no_temp(tmp_path):
    base = make_crag(tmp_path / "raw")
    # a truncated PNG in the last split: found only while copying into the staging folder
    broken = base / "valid/Images/test_2.png"
    broken.write_bytes(broken.read_bytes()[:60])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CragIngestError, match=r"cannot read PNG .*valid/Images/test_2\.png"):
        ingest_crag(tmp_path / "raw", out / "crag", expected_train=3, expected_test=2)
    assert list(out.iterdir()) == []


def test_reingest_same_source_is_a_noop(tmp_path):
    make_crag(tmp_path / "raw")
    dest = tmp_path / "crag"
    first = ingest_crag(tmp_path / "raw", dest, expected_train=3, expected_test=2)
    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    archive = zip_folder(tmp_path / "raw", tmp_path / "CRAG.zip")  # same bytes, other container
    second = ingest_crag(archive, dest, expected_train=3, expected_test=2)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == stamps


def test_reingest_changed_source_replaces_dest(tmp_path):
    base = make_crag(tmp_path / "raw")
    dest = tmp_path / "crag"
    ingest_crag(tmp_path / "raw", dest, expected_train=3, expected_test=2)
    save_png(base / "train/Images/train_1.png", np.zeros((H, W, 3), np.uint8))
    summary = ingest_crag(tmp_path / "raw", dest, expected_train=3, expected_test=2)
    new_bytes = (base / "train/Images/train_1.png").read_bytes()
    assert (dest / "train/images/train_1.png").read_bytes() == new_bytes
    assert summary["files"]["train/images/train_1.png"]["sha256"] == (
        hashlib.sha256(new_bytes).hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crag", "raw"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    make_crag(tmp_path / "raw")
    dest = tmp_path / "crag"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(CragIngestError, match="not empty and has no ingest.json"):
        ingest_crag(tmp_path / "raw", dest, expected_train=3, expected_test=2)
    assert tree(dest) == {"notes.txt"}


def test_a_zip_with_a_member_twice_is_refused(tmp_path):
    """Two members of one name: which is the image is ambiguous (zipfile would silently read the
    last); the ingest refuses, naming the member, and writes nothing."""
    import warnings

    make_crag(tmp_path / "raw")
    archive = zip_folder(tmp_path / "raw", tmp_path / "CRAG.zip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(archive, "a") as appended:
            appended.writestr("CRAG/train/Images/train_1.png", b"another image")
    dest = tmp_path / "out" / "crag"
    with pytest.raises(CragIngestError, match=r"more than once \(e\.g\. "
                                              r"CRAG/train/Images/train_1\.png\)"):
        ingest_crag(archive, dest, expected_train=3, expected_test=2)
    assert not dest.exists()


def test_an_image_far_larger_than_crags_is_refused_from_its_header(tmp_path, monkeypatch):
    """A huge PNG (here past a lowered cap; a real one of 144 megapixels stayed under Pillow's
    limit and took 4.4 GB to preprocess) is refused from its header, named, before decoding."""
    from agcl.data import crag_ingest

    make_crag(tmp_path / "raw")
    monkeypatch.setattr(crag_ingest, "MAX_IMAGE_PIXELS", H * W - 1)
    with pytest.raises(CragIngestError, match=rf"is {W} x {H} = .* megapixels; expected at "
                                              "most"):
        ingest_crag(tmp_path / "raw", tmp_path / "out" / "crag", expected_train=3,
                    expected_test=2)
    monkeypatch.setattr(crag_ingest, "MAX_IMAGE_PIXELS", H * W)
    ingest_crag(tmp_path / "raw", tmp_path / "out" / "crag", expected_train=3, expected_test=2)
