"""`agcl plan`: job counts from Snakemake's dry run, GPU hours from a throughput table, disk."""

from __future__ import annotations

import math
import re
import shutil

import h5py
import pandas as pd
import pytest
import torch

from agcl.cli import main
from agcl.config import expected_runs, load_config
from agcl.data.preprocess import load_index
from agcl.report.plan import (
    THROUGHPUT_COLUMNS,
    checkpoint_bytes,
    gpu_hours,
    job_counts,
    prediction_bytes,
    read_throughput,
)
from agcl.runtime.runfolder import FINAL
from tests.test_pipeline import prepare, run_cli


def throughput_rows(*rows: dict) -> pd.DataFrame:
    base = {c: "" for c in THROUGHPUT_COLUMNS}
    return pd.DataFrame([{**base, **row} for row in rows])


def row(method, stage, steps_per_s, card="H100", dataset="la", val_seconds="", **shape):
    return {"dataset": dataset, "method": method, "stage": stage, "card": card,
            "batch_size": shape.get("batch_size", 4), "labeled_batch_size": 2,
            "patch": shape.get("patch", "32x32x16"), "amp": "auto", "steps_per_s": steps_per_s,
            "net": shape.get("net", "n_filters=2" if dataset == "la" else "base_features=2"),
            "val_seconds": val_seconds}


def grid_config(tiny_project) -> dict:
    config = load_config(tiny_project)
    config["methods"] = ["supervised", "bcp"]
    return config


def test_gpu_hours_from_the_measured_steps_per_second(tiny_project):
    config = grid_config(tiny_project)
    config["datasets"]["la"]["hparams"] = {"bcp": {"pretrain_iterations": 6}}
    throughput = throughput_rows(
        row("supervised", "main", 2.0),
        row("bcp", "pretrain", 3.0), row("bcp", "main", 1.0),
        row("supervised", "main", 0.5, card="T4"),  # T4 lacks bcp: its grid total is incomplete
        row("supervised", "main", 99.0, batch_size=8),  # another recipe shape: not used
        row("supervised", "main", 98.0, net="n_filters=16"),  # another width: not used
    )
    hours = gpu_hours(config, throughput).set_index(["dataset", "method"])
    sup, bcp = hours.loc[("la", "supervised")], hours.loc[("la", "bcp")]
    assert sup["runs"] == 2 * 2 and bcp["runs"] == 2 * 2  # ratios x seeds
    assert sup["iterations_per_run"] == 4 and bcp["iterations_per_run"] == 6 + 4
    assert sup["H100 h/run"] == pytest.approx(4 / 2.0 / 3600)
    assert bcp["H100 h/run"] == pytest.approx((6 / 3.0 + 4 / 1.0) / 3600)
    assert bcp["H100 h total"] == pytest.approx(4 * (6 / 3.0 + 4 / 1.0) / 3600)
    assert sup["T4 h/run"] == pytest.approx(4 / 0.5 / 3600)
    assert math.isnan(bcp["T4 h/run"])
    assert math.isnan(hours.loc[("acdc", "supervised"), "H100 h/run"])  # not measured


def test_gpu_hours_add_validation_passes_of_best_val_runs(tiny_project):
    config = grid_config(tiny_project)  # acdc: best_val, val_every 2, 4 iterations
    throughput = throughput_rows(row("supervised", "main", 4.0, dataset="acdc", patch="32x32",
                                     val_seconds=1.5))
    hours = gpu_hours(config, throughput).set_index(["dataset", "method"])
    assert hours.loc[("acdc", "supervised"), "H100 h/run"] == pytest.approx((4 / 4.0 + 2 * 1.5)
                                                                            / 3600)


def test_bad_throughput_table_is_named(tmp_path):
    path = tmp_path / "throughput.csv"
    path.write_text("dataset,method,steps_per_s\nla,bcp,3\n")
    with pytest.raises(ValueError, match=r"throughput.csv: missing column\(s\) \['stage'"):
        read_throughput(path)
    throughput_rows(row("bcp", "main", 0)).to_csv(path, index=False)
    with pytest.raises(ValueError, match="steps_per_s must be a positive number"):
        read_throughput(path)
    assert read_throughput(tmp_path / "absent.csv").empty


def test_checkpoint_sizes_match_a_trained_run(tiny_project):
    layout = prepare(tiny_project, "la")
    run = layout.run("la", "supervised", 0.1, 0)
    run_cli("train", "la", "--config", tiny_project, "--method", "supervised", "--labels", "0.1",
            "--seed", "0", "--out", run, "--no-progress")
    state = torch.load(run / FINAL, weights_only=True)["state_dict"]
    saved = sum(t.numel() * t.element_size() for t in state.values())
    sizes = checkpoint_bytes(load_config(tiny_project), "la", "supervised")
    assert sizes["final"] == saved
    n_params = sum(t.numel() for k, t in state.items() if "running" not in k and "num_batches" not in k)
    # resume: the whole method (here the student alone) plus one momentum tensor per parameter
    assert sizes["resume"] == saved + 4 * n_params
    # the mean teacher keeps a second copy of the network in its resume checkpoint
    assert checkpoint_bytes(load_config(tiny_project), "la", "mean_teacher")["resume"] == (
        2 * saved + 4 * n_params)


def test_prediction_bound_from_the_test_shapes(tiny_project):
    layout = prepare(tiny_project, "acdc")
    config = load_config(tiny_project)
    index = load_index(layout.processed("acdc"))
    expected = 0
    for frame in index["lists"]["test"]:  # preprocess records the shape of every test volume
        with h5py.File(layout.processed("acdc") / index["items"][frame]["file"]) as h5:
            expected += math.prod(h5["image"].shape)
    assert prediction_bytes(config, "acdc") == expected
    assert prediction_bytes(config, "la") is None  # not preprocessed


@pytest.mark.skipif(shutil.which("git") is None, reason="Snakemake needs git for its metadata")
def test_plan_prints_jobs_hours_and_disk(tiny_project, capsys):
    config = load_config(tiny_project)
    whole, remaining = job_counts(tiny_project)
    assert whole["train"] == remaining["train"] == len(expected_runs(config)) == 3 * 2 * 2
    assert whole["evaluate"] == whole["train"] and whole["report"] == 1
    assert main(["plan", "--config", str(tiny_project), "--throughput", "absent.csv"]) == 0
    text = capsys.readouterr().out
    assert "not measured: absent.csv does not exist" in text
    assert "train    12            12" in text
    # one method only: nothing to compare, and the plan says so
    assert "What the grid can conclude" in text and "no comparison" in text
    disk = text.split("Disk")[1]  # nothing prepared yet: no data folders, no predictions bound
    assert re.search(r"^\s+la\s+-\s+-\s+[\d.]+ [KM]B\s+[\d.]+ [KM]B\s+-$", disk, re.MULTILINE), disk


def test_statistics_plan_families_prior_and_measured_spread(tiny_project):
    from agcl.config import Layout
    from agcl.report.power import comparison_families, statistics_plan

    config = load_config(tiny_project)
    config.update(methods=["supervised", "mean_teacher", "bcp", "semi_agcl"],
                  seeds=list(range(8)),
                  roles={"lower_bound": "supervised", "method_of_interest": "semi_agcl"})
    families = comparison_families(config)
    # one family per dataset x ratio x reference (semi_agcl, supervised), 3 other methods each
    assert {(f["reference"], f["tests"], f["seeds"]) for f in families} == {
        ("semi_agcl", 3, 8), ("supervised", 3, 8)}
    plan = statistics_plan(config)
    dice = plan[(plan["metric"] == "Dice") & (plan["reference"] == "semi_agcl")].iloc[0]
    assert dice["min p_holm"] == f"{3 * 2 / 256:.3g}" and dice["min seeds (sign-flip)"] == 7
    assert dice["per-seed sd"] == "2.00 pts prior"  # config stats.prior_seed_sd
    # 1 point at sd 2: delta 0.5 under Holm with 3 tests
    from agcl.report.intervals import seeds_needed

    assert dice["seeds for it"] == str(seeds_needed(0.5, 3))
    # a stats.csv of the grid: its measured per-seed sd replaces the prior
    summary = Layout(config).results / "summary"
    summary.mkdir(parents=True)
    la_ratio = config["ratios"][0]
    pd.DataFrame([{"dataset": "la", "ratio": la_ratio, "reference": "semi_agcl",
                   "metric": "dice", "seed_sd": sd} for sd in (0.01, 0.03, 0.05)]).to_csv(
        summary / "stats.csv", index=False)
    measured = statistics_plan(config)
    row = measured[(measured["dataset"] == "la") & (measured["metric"] == "Dice")
                   & (measured["reference"] == "semi_agcl")
                   & (measured["labels"] == f"{100 * la_ratio:g}%")].iloc[0]
    assert row["per-seed sd"] == "3.00 pts measured (3 comparisons)"
    # 3 seeds, 3 tests: the t test has no floor, but only a large effect is detected
    config["seeds"] = [0, 1, 2]
    three = statistics_plan(config).iloc[0]
    assert three["min p_holm"] == "no floor (t)" and float(three["detectable (80%)"][:-4]) > 10
