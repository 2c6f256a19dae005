"""Every stage through the `agcl` CLI on tiny synthetic data: the DAG a user runs, minus Snakemake."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agcl.cli import main
from agcl.config import Layout, load_config
from agcl.engine import trainer as trainer_module
from agcl.engine.trainer import Trainer
from agcl.runtime.runfolder import FINAL, LAST


def run_cli(*args: str) -> None:
    assert main([str(a) for a in args]) == 0, args


def prepare(config_path: Path, dataset: str, seeds=(0,)) -> Layout:
    config = load_config(config_path)
    layout = Layout(config)
    if dataset == "crag":
        run_cli("synth", "crag", "--out", layout.data / "synthetic", "--config", config_path, "--zip")
        run_cli("ingest-crag", layout.data / "synthetic" / "CRAG.zip", "--dest", layout.raw("crag"),
                "--expect", "10,2")
    else:
        run_cli("synth", dataset, "--out", layout.raw(dataset), "--config", config_path)
    run_cli("preprocess", dataset, "--src", layout.raw(dataset), "--out", layout.processed(dataset),
            "--config", config_path)
    for seed in seeds:
        run_cli("splits", dataset, "--config", config_path, "--seed", seed)
    return layout


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / FINAL, weights_only=True)["state_dict"]


@pytest.mark.parametrize("dataset", ["la", "acdc", "crag"])
def test_stages_end_to_end(tiny_project, dataset):
    layout = prepare(tiny_project, dataset)
    run = layout.run(dataset, "supervised", 0.1, 0)
    run_cli("train", dataset, "--config", tiny_project, "--method", "supervised",
            "--labels", "0.1", "--seed", "0", "--out", run, "--no-progress")
    meta = json.loads((run / "run.json").read_text())
    assert meta["n_labeled"] >= 1 and meta["iterations"] == 4
    assert meta["code_version"] and meta["config"]["name"] == "tiny"
    log = pd.read_csv(run / "train_log.csv")
    assert list(log["step"]) == [1, 2, 3, 4] and np.isfinite(log["loss"]).all()
    assert not (run / LAST).exists()

    run_cli("evaluate", dataset, "--config", tiny_project, "--run", run)
    metrics = json.loads((run / "metrics.json").read_text())
    n_classes = {"la": 1, "acdc": 3, "crag": 1}[dataset]
    n_test = {"la": 2, "acdc": 4, "crag": 2}[dataset]  # ACDC: 2 test patients x 2 frames
    assert len(metrics["metric_per_case"]) == n_test * n_classes
    assert {r["case"] for r in metrics["metric_per_case"]} == set(
        json.loads(layout.splits(dataset, 0).read_text())["test"])
    assert metrics["selection"]["test_used_for_selection"] is False
    assert metrics["selection"]["policy"] == meta["selection"]
    for rec in metrics["metric_per_case"]:
        assert 0.0 <= rec["dice"] <= 1.0
        assert {"case", "class", "hd95", "asd", "policy_applied", "empty_pred"} <= set(rec)
    expected_mean = np.mean([r["dice"] for r in metrics["metric_per_case"] if r["class"] == 1])
    assert metrics["mean"]["1"]["dice"] == pytest.approx(expected_mean)
    if dataset == "crag":  # GlaS object metrics next to the pixel metrics, from the instance maps
        records = metrics["metric_per_case"]
        assert all(0.0 <= r["object_f1"] <= 1.0 and r["n_gt_objects"] >= 1 for r in records)
        assert metrics["object_mean"]["object_f1"] == pytest.approx(
            np.mean([r["object_f1"] for r in records]))
    else:
        assert "object_mean" not in metrics


def test_finished_run_is_not_overwritten(tiny_project):
    layout = prepare(tiny_project, "la")
    run = layout.run("la", "supervised", 0.1, 0)
    args = ["train", "la", "--config", tiny_project, "--method", "supervised",
            "--labels", "0.1", "--seed", "0", "--out", run, "--no-progress"]
    run_cli(*args)
    assert main([str(a) for a in args]) == 1
    run_cli(*args, "--force")


def test_same_seed_same_weights_and_resume_matches(tiny_project, monkeypatch):
    prepare(tiny_project, "la")
    config = load_config(tiny_project)
    first, second, resumed = (Path(f"runs/{n}") for n in ("a", "b", "resumed"))
    Trainer(config, "la", "supervised", 0.1, 0, first, progress=False).run()
    Trainer(config, "la", "supervised", 0.1, 0, second, progress=False).run()
    for key, value in weights(first).items():
        assert torch.equal(value, weights(second)[key]), key

    # Crash right after the step-2 checkpoint, then resume from it.
    original = trainer_module.Trainer._step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, "la", "supervised", 0.1, 0, resumed, progress=False).run()
    assert (resumed / LAST).exists() and not (resumed / FINAL).exists()
    monkeypatch.setattr(trainer_module.Trainer, "_step", original)
    Trainer(config, "la", "supervised", 0.1, 0, resumed, progress=False).run()
    for key, value in weights(first).items():
        assert torch.equal(value, weights(resumed)[key]), key
    log = pd.read_csv(resumed / "train_log.csv")
    assert list(log["step"]) == [1, 2, 3, 4]


def test_best_val_selection_is_recorded(tiny_project):
    layout = prepare(tiny_project, "acdc")
    run = layout.run("acdc", "supervised", 0.1, 0)
    meta = Trainer(load_config(tiny_project), "acdc", "supervised", 0.1, 0, run,
                   progress=False).run()
    assert meta["selection"] == "best_val" and meta["best_val_step"] in (2, 4)
    log = pd.read_csv(run / "train_log.csv")
    assert log["val_dice"].notna().sum() == 2  # validated at steps 2 and 4


def test_aggregate_and_report_with_missing_runs(tiny_project):
    layout = prepare(tiny_project, "la", seeds=(0, 1))
    for seed in (0, 1):
        run = layout.run("la", "supervised", 0.1, seed)
        run_cli("train", "la", "--config", tiny_project, "--method", "supervised",
                "--labels", "0.1", "--seed", seed, "--out", run, "--no-progress")
        run_cli("evaluate", "la", "--config", tiny_project, "--run", run,
                "--save-predictions")
    run_cli("aggregate", "--config", tiny_project)
    summary = pd.read_csv(layout.results / "summary" / "summary.csv")
    runs = pd.read_csv(layout.results / "summary" / "runs.csv")
    row = summary[(summary.dataset == "la") & (summary.ratio == 0.1)].iloc[0]
    assert row["n_seeds"] == 2
    assert row["dice_mean"] == pytest.approx(runs["dice"].mean())
    assert row["dice_std"] == pytest.approx(runs["dice"].std(ddof=1))
    missing = pd.read_csv(layout.results / "summary" / "missing.csv")
    # 3 datasets x 2 ratios x 2 seeds = 12 expected, 2 present
    assert len(missing) == 10
    run_cli("report", "--config", tiny_project)
    html = (layout.report / "index.html").read_text()
    assert 'id="table-la"' in html
    # label efficiency, per case, training curves and the LA overlays (from predictions.npz)
    assert html.count("data:image/png;base64,") == 4
    assert "Best, median and worst test case by supervised" in html
    assert "10 run(s) of the grid are not counted in any table" in html
    assert "not evaluated (no metrics.json)" in html


def test_evaluation_takes_window_and_precision_from_the_run_s_recipe(tiny_project):
    """A train_by_method entry that gives a method its own crop: validation (the trainer) and
    test (evaluation) both slide that crop, read from the run's run.json, not the dataset's
    train block."""
    import yaml

    config = yaml.safe_load(tiny_project.read_text())
    crag = config["datasets"]["crag"]
    crag["eval"] = {}  # the window follows the training crop
    crag["train_by_method"] = {"supervised": {"patch": [16, 16]}}
    tiny_project.write_text(yaml.safe_dump(config))
    layout = prepare(tiny_project, "crag")
    run = layout.run("crag", "supervised", 0.1, 0)
    run_cli("train", "crag", "--config", tiny_project, "--method", "supervised", "--labels", "0.1",
            "--seed", "0", "--out", run, "--no-progress")
    assert json.loads((run / "run.json").read_text())["train"]["patch"] == [16, 16]
    run_cli("evaluate", "crag", "--config", tiny_project, "--run", run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"]["patch"] == [16, 16] and metrics["protocol"]["stride"] == [16, 16]
