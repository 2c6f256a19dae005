"""Readers of the upstream formats, checked on the real mirror files and on broken tmp files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from agcl.data.formats import (
    FormatError,
    acdc_frame_files,
    la_case_path,
    parse_slice_name,
    read_crag_pair,
    read_h5_volume,
    read_list,
)
from agcl.data.specs import SPECS

# --- real upstream files (subset mirror) -------------------------------------------------------


def test_real_list_lengths(la_mirror_dir, acdc_lists_mirror_dir):
    assert len(read_list(la_mirror_dir / "train.list")) == 80
    assert len(read_list(la_mirror_dir / "test.list")) == 20
    expected = {"train.list": 140, "val.list": 20, "test.list": 40, "train_slices.list": 1312}
    for name, n in expected.items():
        assert len(read_list(acdc_lists_mirror_dir / name)) == n, name


def test_real_acdc_splits_are_disjoint_and_paired(acdc_lists_mirror_dir):
    splits = {s: read_list(acdc_lists_mirror_dir / f"{s}.list") for s in ("train", "val", "test")}
    patients = {s: {name[:10] for name in ids} for s, ids in splits.items()}
    assert len(patients["train"]) == 70 and len(patients["val"]) == 10
    assert len(patients["test"]) == 20
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    for ids in splits.values():
        assert ids[0::2] == [p + "_frame01" for p in (n[:10] for n in ids[0::2])]
        assert [n[:10] for n in ids[1::2]] == [n[:10] for n in ids[0::2]]


def test_real_acdc_frame_mapping(acdc_volumes_mirror_dir):
    mapping = acdc_frame_files(acdc_volumes_mirror_dir.parent)
    assert mapping["patient099_frame01"].name == "patient099_frame01.h5"
    assert mapping["patient099_frame02"].name == "patient099_frame09.h5"
    assert mapping["patient011_frame02"].name == "patient011_frame08.h5"
    # the mirror holds 8 patients; a restricted download must not be an error
    assert len(mapping) == 16
    assert all(path.is_file() for path in mapping.values())


def test_real_la_case_reads(la_mirror_dir):
    case = read_list(la_mirror_dir / "train.list")[0]
    image, label = read_h5_volume(la_case_path(la_mirror_dir, case), label_values={0, 1})
    assert image.dtype == np.float32 and image.ndim == 3
    assert image.shape[2] == 88 and label.shape == image.shape
    assert label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1}


def test_real_acdc_volume_reads(acdc_volumes_mirror_dir):
    image, label = read_h5_volume(
        acdc_volumes_mirror_dir / "patient099_frame09.h5", label_values={0, 1, 2, 3}
    )
    assert image.dtype == np.float32 and image.shape == (16, 224, 154)
    low, high = SPECS["acdc"].intensity_range  # the bounds a photometric augmentation clips to
    assert low == image.min() and image.max() == high
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    with pytest.raises(FormatError, match=r"patient099_frame09\.h5.*'label'.*\[2, 3\]"):
        read_h5_volume(acdc_volumes_mirror_dir / "patient099_frame09.h5", label_values={0, 1})


def test_real_labeled_slices_are_first_three_patients(acdc_lists_mirror_dir, acdc_volumes_mirror_dir):
    train = read_list(acdc_lists_mirror_dir / "train.list")
    slices = [parse_slice_name(s) for s in read_list(acdc_lists_mirror_dir / "train_slices.list")]
    first_68 = {frame for frame, _ in slices[:68]}
    assert first_68 == set(train[:6])  # 3 patients, both frames each
    assert slices[68][0] == train[6]

    mapping = acdc_frame_files(acdc_volumes_mirror_dir.parent)
    for frame in ("patient099_frame01", "patient099_frame02"):
        n_slices = read_h5_volume(mapping[frame])[0].shape[0]
        numbers = sorted(k for f, k in slices if f == frame)
        assert numbers == list(range(1, n_slices + 1)), frame


# --- parsers ------------------------------------------------------------------------------------


def test_parse_slice_name():
    assert parse_slice_name("patient099_frame01_slice_15") == ("patient099_frame01", 15)
    assert parse_slice_name("patient001_frame02_slice_1") == ("patient001_frame02", 1)
    for bad in ("patient099_frame01", "patient099_frame01_slice_0", "patient99_frame01_slice_3",
                "patient099_frame01_slice_x", " patient099_frame01_slice_2"):
        with pytest.raises(FormatError, match="malformed"):
            parse_slice_name(bad)


def test_read_list_strips_and_skips_blanks(tmp_path):
    path = tmp_path / "train.list"
    path.write_text("  a1 \n\nb2\n\n  \nc3")
    assert read_list(path) == ["a1", "b2", "c3"]


def test_read_list_errors(tmp_path):
    empty = tmp_path / "empty.list"
    empty.write_text("\n  \n")
    with pytest.raises(FormatError, match=r"empty\.list.*empty"):
        read_list(empty)
    dup = tmp_path / "dup.list"
    dup.write_text("a\nb\na\nc\nb\n")
    with pytest.raises(FormatError, match=r"dup\.list: duplicate ids \['a', 'b'\]"):
        read_list(dup)


# --- h5 errors ----------------------------------------------------------------------------------


def _write_h5(path, **arrays):
    with h5py.File(path, "w") as h5:
        for key, value in arrays.items():
            h5.create_dataset(key, data=value)
    return path


def test_h5_missing_key(tmp_path):
    path = _write_h5(tmp_path / "case.h5", image=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(FormatError, match=r"case\.h5: missing key 'label'"):
        read_h5_volume(path)


def test_h5_wrong_ndim(tmp_path):
    path = _write_h5(tmp_path / "case.h5", image=np.zeros((3, 4), np.float32),
                     label=np.zeros((3, 4), np.uint8))
    with pytest.raises(FormatError, match=r"case\.h5: key 'image' has 2 dimensions.*3D"):
        read_h5_volume(path)


def test_h5_shape_and_dtype_mismatch(tmp_path):
    path = _write_h5(tmp_path / "shape.h5", image=np.zeros((2, 3, 4), np.float32),
                     label=np.zeros((2, 3, 5), np.uint8))
    with pytest.raises(FormatError, match=r"shape\.h5: key 'label' has shape \(2, 3, 5\)"):
        read_h5_volume(path)
    path = _write_h5(tmp_path / "int_image.h5", image=np.zeros((2, 3, 4), np.int16),
                     label=np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(FormatError, match=r"int_image\.h5: key 'image' has dtype int16"):
        read_h5_volume(path)
    path = _write_h5(tmp_path / "float_label.h5", image=np.zeros((2, 3, 4), np.float32),
                     label=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(FormatError, match=r"float_label\.h5: key 'label'.*expected integer"):
        read_h5_volume(path)


def test_h5_converts_dtypes(tmp_path):
    label = np.zeros((2, 3, 4), np.int64)
    label[1, 2, 3] = 1
    path = _write_h5(tmp_path / "ok.h5", image=np.full((2, 3, 4), 0.5, np.float64), label=label)
    image, read_label = read_h5_volume(path, label_values={0, 1})
    assert image.dtype == np.float32 and read_label.dtype == np.uint8
    assert read_label.sum() == 1 and read_label[1, 2, 3] == 1


def test_h5_not_hdf5(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(FormatError, match=r"junk\.h5: cannot open as HDF5"):
        read_h5_volume(path)


# --- ACDC frame mapping errors ------------------------------------------------------------------


def test_acdc_frame_files_needs_two_frames(tmp_path):
    volumes = tmp_path / "ACDC_training_volumes"
    volumes.mkdir()
    for name in ("patient001_frame01", "patient001_frame12", "patient002_frame01"):
        (volumes / f"{name}.h5").touch()
    with pytest.raises(FormatError, match=r"patient002 has 1 frame files"):
        acdc_frame_files(tmp_path)
    (volumes / "patient002_frame10.h5").touch()
    (volumes / "patient002_frame03.h5").touch()
    with pytest.raises(FormatError, match=r"patient002 has 3 frame files"):
        acdc_frame_files(tmp_path)
    (volumes / "patient002_frame03.h5").unlink()
    mapping = acdc_frame_files(tmp_path)
    assert mapping["patient001_frame02"].name == "patient001_frame12.h5"
    assert mapping["patient002_frame02"].name == "patient002_frame10.h5"


def test_acdc_frame_files_missing_folder(tmp_path):
    with pytest.raises(FormatError, match="ACDC_training_volumes: folder missing"):
        acdc_frame_files(tmp_path)


# --- CRAG pair ----------------------------------------------------------------------------------


def test_crag_pair_roundtrip_and_size_mismatch(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "img.png")
    inst = np.zeros((5, 7), np.uint16)
    inst[1:3, 2:5] = 300  # needs 16 bits
    Image.fromarray(inst).save(tmp_path / "ann.png")
    read_rgb, read_inst = read_crag_pair(tmp_path / "img.png", tmp_path / "ann.png")
    assert read_rgb.shape == (5, 7, 3) and np.array_equal(read_rgb, rgb)
    assert read_inst.dtype == np.int32 and np.array_equal(read_inst, inst.astype(np.int32))

    Image.fromarray(np.zeros((6, 7), np.uint8), "L").save(tmp_path / "small.png")
    with pytest.raises(FormatError, match=r"img\.png is 7x5 but .*small\.png is 7x6"):
        read_crag_pair(tmp_path / "img.png", tmp_path / "small.png")
    with pytest.raises(FormatError, match=r"img\.png: annotation mode RGB"):
        read_crag_pair(tmp_path / "img.png", tmp_path / "img.png")
