"""Bad data and bad configs are caught where they enter, with the file or key named."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from agcl.config import ConfigError, Layout, load_config, validate_config
from agcl.config.checks import check_config
from agcl.data.crag_ingest import CragIngestError, _Source, ingest_crag
from agcl.data.formats import FormatError
from agcl.data.loaders import load_training_set, read_split
from agcl.data.preprocess import load_index, preprocess
from agcl.data.synth import synth_la
from agcl.engine.trainer import Trainer
from agcl.eval.evaluate import evaluate_run
from agcl.report.aggregate import aggregate
from agcl.runtime.runfolder import METRICS_JSON
from tests.test_crag_ingest import make_crag, zip_folder
from tests.test_pipeline import prepare

REPO = Path(__file__).resolve().parents[1]


def poison_h5(path: Path, key: str = "image", value: float = np.nan) -> None:
    with h5py.File(path, "r+") as h5:
        data = h5[key][()]
        data.flat[7] = value
        h5[key][...] = data


# --- non-finite images ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_preprocess_rejects_a_non_finite_volume_naming_the_file(tmp_path, value):
    src = synth_la(tmp_path / "la", n_train=2, n_test=1, size_xy=(32, 32), size_z=16)
    case = (src / "train.list").read_text().split()[1]
    poison_h5(src / "2018LA_Seg_Training Set" / case / "mri_norm2.h5", value=value)
    with pytest.raises(FormatError, match=rf"{case}/mri_norm2\.h5: key 'image' holds 1 "
                                          r"non-finite value\(s\)"):
        preprocess("la", src, tmp_path / "processed")


def test_preprocess_rejects_a_case_in_two_lists_and_an_empty_volume(tmp_path):
    from agcl.data.preprocess import PreprocessError

    src = synth_la(tmp_path / "la", n_train=2, n_test=1, size_xy=(32, 32), size_z=16)
    train = (src / "train.list").read_text().split()
    test_list = src / "test.list"
    original = test_list.read_text()
    test_list.write_text(original + train[0] + "\n")  # a training case scored too
    with pytest.raises(PreprocessError, match=rf"1 case\(s\) in both train\.list and test\.list "
                                              rf"\(e\.g\. {train[0]}\)"):
        preprocess("la", src, tmp_path / "processed")
    test_list.write_text(original)
    path = src / "2018LA_Seg_Training Set" / train[1] / "mri_norm2.h5"
    with h5py.File(path, "r+") as h5:
        for key in ("image", "label"):
            del h5[key]
            h5[key] = np.zeros((32, 32, 0), dtype=np.float32 if key == "image" else np.uint8)
    with pytest.raises(PreprocessError, match=rf"{train[1]}/mri_norm2\.h5: field 'image' has "
                                              r"shape \[32, 32, 0\]: an empty axis"):
        preprocess("la", src, tmp_path / "processed")


def test_evaluation_refuses_a_non_finite_test_volume(tiny_project):
    layout = prepare(tiny_project, "la")
    config = load_config(tiny_project)
    run = Path("runs/a")
    Trainer(config, "la", "supervised", 0.1, 0, run, progress=False).run()
    test_case = read_split(layout.splits("la", 0))["test"][0]
    index = load_index(layout.processed("la"))
    poison_h5(layout.processed("la") / index["items"][test_case]["file"])
    with pytest.raises(FormatError, match=rf"{test_case}/mri_norm2\.h5: key 'image' holds"):
        evaluate_run(config, "la", run)
    assert not (run / METRICS_JSON).exists()


def test_training_slices_are_checked_when_read(tiny_project):
    layout = prepare(tiny_project, "acdc")
    processed = layout.processed("acdc")
    index = load_index(processed)
    split = read_split(layout.splits("acdc", 0))
    name = next(n for n in index["train_slices"] if n in split["labeled"]["0.1"]["slices"])
    with h5py.File(processed / index["slices_file"], "r+") as h5:
        image = h5[name]["image"][()]
        image[0, 0] = np.nan
        h5[name]["image"][...] = image
    with pytest.raises(FormatError, match=rf"{index['slices_file']}: {name}/image holds 1"):
        load_training_set(processed, split, "0.1", [32, 32])


def test_non_finite_metrics_are_rejected_and_listed(tiny_project):
    prepare(tiny_project, "la", seeds=(0, 1))
    config = load_config(tiny_project)
    layout = Layout(config)
    for seed in (0, 1):
        run = layout.run("la", "supervised", 0.1, seed)
        Trainer(config, "la", "supervised", 0.1, seed, run, progress=False).run()
        evaluate_run(config, "la", run)
    path = layout.run("la", "supervised", 0.1, 1) / METRICS_JSON
    metrics = json.loads(path.read_text())
    metrics["metric_per_case"][0]["dice"] = float("nan")
    path.write_text(json.dumps(metrics))
    aggregate(config)
    summary = pd.read_csv(layout.results / "summary" / "summary.csv")
    row = summary[(summary.dataset == "la") & (summary.ratio == 0.1)].iloc[0]
    assert (row["n_seeds"], row["n_expected_seeds"]) == (1, 2)  # seed 1 is not averaged in
    missing = pd.read_csv(layout.results / "summary" / "missing.csv")
    reason = missing[(missing.dataset == "la") & (missing.ratio == 0.1) & (missing.seed == 1)
                     ]["reason"].iloc[0]
    assert "non-finite values in metrics.json: metric_per_case[0].dice = nan" in reason
    per_case = pd.read_csv(layout.results / "summary" / "per_case.csv")
    assert set(per_case["seed"]) == {0} and np.isfinite(per_case["dice"]).all()


# --- CRAG ingest ----------------------------------------------------------------------------
def test_missing_image_is_named_with_its_unpaired_annotation(tmp_path):
    base = make_crag(tmp_path / "raw")
    (base / "train/Images/train_2.png").unlink()
    archive = zip_folder(tmp_path / "raw", tmp_path / "CRAG.zip")
    with pytest.raises(CragIngestError) as info:
        ingest_crag(archive, tmp_path / "crag", expected_train=3, expected_test=2)
    message = str(info.value)
    assert "expected 3 train images, found 2" in message
    assert "missing image(s) train_2.png" in message
    assert "CRAG/train/Annotation/train_2.png have no image" in message


def test_oversized_zip_member_is_refused_before_reading(tmp_path, monkeypatch):
    make_crag(tmp_path / "raw")
    archive = zip_folder(tmp_path / "raw", tmp_path / "CRAG.zip")
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("CRAG/train/Images/train_9.png", b"\0" * (3 * 2**20))  # compresses to ~3 KB
    assert archive.stat().st_size < 2**20

    def no_reading(self, relpath):
        raise AssertionError(f"read {relpath} before checking declared sizes")

    monkeypatch.setattr(_Source, "read", no_reading)
    with pytest.raises(CragIngestError, match=r"CRAG\.zip:CRAG/train/Images/train_9\.png is "
                                              r"3\.0 MiB \(the cap is 1 MiB per file"):
        ingest_crag(archive, tmp_path / "crag", expected_train=3, expected_test=2,
                    max_member_bytes=2**20)
    assert not (tmp_path / "crag").exists()


def test_reading_stops_at_the_cap_even_if_the_size_lies(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "big.png").write_bytes(b"\0" * 4096)
    source = _Source(folder, max_member_bytes=8192)
    (folder / "big.png").write_bytes(b"\0" * 10_000)  # grew after the size check
    with pytest.raises(CragIngestError, match="larger than declared"):
        source.read("big.png")


def test_non_png_file_is_named_without_python_reprs(tmp_path):
    base = make_crag(tmp_path / "raw")
    (base / "train/Images/train_1.png").write_text("this is not an image")
    with pytest.raises(CragIngestError) as info:
        ingest_crag(tmp_path / "raw", tmp_path / "crag", expected_train=3, expected_test=2)
    message = str(info.value)
    assert "train/Images/train_1.png is not an image Pillow can read (expected a PNG" in message
    assert "BytesIO" not in message and "object at 0x" not in message


# --- configs that name what is not there ----------------------------------------------------
def demo_config() -> dict:
    import yaml

    return validate_config(yaml.safe_load((REPO / "config" / "demo.yaml").read_text()))


def test_unregistered_method_is_a_config_error():
    config = demo_config()
    config["methods"].append("mean_teachr")
    with pytest.raises(ConfigError, match=r"methods\[\d\]: 'mean_teachr' is not a registered "
                                          r"method or a variant \(registered: .*mean_teacher"):
        check_config(config)


def test_hparams_of_a_misspelt_method_or_key_are_config_errors():
    config = demo_config()
    config["hparams"] = {"ua_mtt": {"ema_decay": 0.9}}
    with pytest.raises(ConfigError, match=r"hparams\.ua_mtt: 'ua_mtt' is not a registered"):
        check_config(config)
    config["hparams"] = {}
    config["datasets"]["la"]["hparams"] = {"ua_mt": {"ema_decy": 0.9}}
    with pytest.raises(ConfigError, match=r"datasets\.la\.hparams\.ua_mt: method 'ua_mt' has no "
                                          r"hyperparameter ema_decy"):
        check_config(config)


def test_snakemake_stops_at_start_on_an_unregistered_method(tmp_path):
    import yaml

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["methods"] = ["supervised", "mean_teachr"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad),
                          "--cores", "1", "--workflow-profile", "none", "--directory",
                          str(tmp_path), "--snakefile", str(REPO / "Snakefile")],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "'mean_teachr' is not a registered method" in out.stdout + out.stderr


def test_a_patch_of_the_wrong_dimension_is_a_config_error():
    """A 2D patch for LA (3D) used to fail inside torch; now the key is named."""
    config = validate_config(load_config(REPO / "config" / "demo.yaml"))
    config["datasets"]["la"]["train"]["patch"] = [32, 32]
    with pytest.raises(ConfigError, match=r"datasets\.la\.train\.patch \[32, 32\]: la trains and "
                                          r"predicts on 3D patches, expected 3 values"):
        check_config(config, "demo.yaml")
