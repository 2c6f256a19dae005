"""DatasetSpec carries what differs per dataset: a new dataset is one SPECS entry (plus readers of
its own format where it has one), and specs.py stays a plain-dataclass module."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from agcl.data import specs
from agcl.data.loaders import load_cases, load_training_set
from agcl.data.preprocess import PREPROCESSORS, preprocess
from agcl.data.splits import make_splits
from agcl.data.synth import synth_la
from agcl.report.figures import _display_slice


def test_specs_import_without_torch_or_numpy():
    code = ("import sys, agcl.data.specs; "
            "print(sorted(m for m in ('torch', 'numpy', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_spec_has_its_readers():
    for spec in specs.SPECS.values():
        assert spec.source_format in PREPROCESSORS
        assert spec.layout in specs.LAYOUTS and spec.val_from in specs.VAL_FROM


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be one of volumes, slices, tiles"):
        dataclasses.replace(specs.SPECS["la"], layout="folders")


def test_a_fourth_dataset_is_one_spec_entry(tmp_path, monkeypatch):
    """LA's format under another name, with another display axis and no spacing: preprocess,
    splits, training set, cases and figure follow the entry, no code edited."""
    monkeypatch.setitem(specs.SPECS, "la2", dataclasses.replace(
        specs.SPECS["la"], name="la2", display_axis=1, spacing_mm=None, manifests=()))
    synth_la(tmp_path / "raw", seed=0, n_train=6, n_test=2, size_xy=(20, 24), size_z=12)
    index = preprocess("la2", tmp_path / "raw", tmp_path / "proc")
    assert index["dataset"] == "la2"
    split = make_splits(index, [0.2, 0.5], seed=1, val_cases=1)
    assert split["unit"] == "case" and len(split["val"]) == 1
    data = load_training_set(tmp_path / "proc", split, next(iter(split["labeled"])), [16, 16, 8])
    assert len(data.labeled_images) == 1 and len(data.unlabeled_images) == 4
    case = load_cases(tmp_path / "proc", split["test"])[0]
    view, _, take = _display_slice(case.image, case.label, "la2")
    assert view.ndim == 2 and isinstance(take[1], int)
