"""The report renders from a fixture grid (some runs missing) and opens in a headless browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from agcl.common.utils import write_json
from agcl.config import Layout, validate_config
from agcl.report.aggregate import aggregate
from agcl.report.render import render_report
from agcl.runtime.runfolder import FINAL, METRICS_JSON, RUN_JSON

CASES = [f"case{i:02d}" for i in range(8)]


def fixture_config() -> dict:
    train = {"iterations": 10, "batch_size": 2, "labeled_batch_size": 1, "patch": [16, 16, 16]}
    return validate_config({
        "name": "fixture", "seeds": [0, 1], "methods": ["supervised", "semi_agcl"],
        "ratios": [0.05, 0.1], "datasets": {"la": {"source": "synthetic", "train": train,
                                                   "eval": {}}},
    })


def fake_metrics(method: str, ratio: float, seed: int, empty_policy: str) -> dict:
    rng = np.random.default_rng([seed, int(ratio * 100), len(method)])
    base = 0.85 if method == "semi_agcl" else 0.7
    records = []
    for i, case in enumerate(CASES):
        dice = float(np.clip(base + 0.01 * i + rng.normal(0, 0.02), 0, 1))
        empty = method == "supervised" and i == 0 and seed == 0  # one empty prediction
        records.append({
            "case": case, "class": 1, "class_name": "left atrium",
            "dice": 0.0 if empty else dice, "jaccard": 0.0 if empty else dice / (2 - dice),
            "hd95": math.nan if empty else 10 * (1 - dice), "asd": math.nan if empty else 3 * (1 - dice),
            "empty_pred": empty, "empty_gt": False,
            "policy_applied": "metrics_reloaded" if empty else None, "worst_distance": 100.0,
        })
    mean = {m: float(np.mean([r["worst_distance"] if math.isnan(r[m]) else r[m] for r in records]))
            for m in ("dice", "jaccard", "hd95", "asd")}
    return {"metric_per_case": records, "foreground_mean": mean,
            "selection": {"policy": "last", "step": 10, "test_used_for_selection": False},
            "protocol": {"units": "voxels", "empty_policy": empty_policy,
                         "policy_applied_count": sum(r["empty_pred"] for r in records)},
            "code_version": "0.1.0+test"}


def write_evaluated_run(run, metrics: dict, run_id: str = "fixture-run", **meta) -> None:
    """A run folder as training + evaluation leave it: final model, run.json (its identity read
    from the grid's path .../<dataset>/<method>/r<ratio>/s<seed>), metrics.json."""
    run.mkdir(parents=True, exist_ok=True)
    (run / FINAL).write_bytes(b"weights")  # aggregation reads only the two JSON files
    dataset, method, ratio, seed = run.parts[-4:]
    identity = {"dataset": dataset, "method": method, "ratio": float(ratio[1:]),
                "seed": int(seed[1:])}
    write_json(run / RUN_JSON, {"run_id": run_id, **identity, **meta})
    write_json(run / METRICS_JSON, {**metrics, "run_id": run_id})


@pytest.fixture
def fixture_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = fixture_config()
    layout = Layout(config)
    for method in config["methods"]:
        for ratio in config["ratios"]:
            for seed in config["seeds"]:
                if method == "semi_agcl" and ratio == 0.1 and seed == 1:
                    continue  # a missing run
                run = layout.run("la", method, ratio, seed)
                policy = "reference" if (method, ratio, seed) == ("supervised", 0.1, 1) else \
                    "metrics_reloaded"
                # training time: supervised 60 s + 6 s per seed, semi_agcl twice that
                seconds = (60 + 6 * seed) * (2 if method == "semi_agcl" else 1)
                write_evaluated_run(run, fake_metrics(method, ratio, seed, policy),
                                    train_seconds=seconds, parameters=9_440_000, device="cpu",
                                    amp="bfloat16")
                pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.8, 0.5],
                              "val_dice": [np.nan, np.nan, np.nan]}).to_csv(
                    run / "train_log.csv", index=False)
    aggregate(config)
    return config, layout


def test_aggregate_tables_from_per_case_records(fixture_grid):
    _, layout = fixture_grid
    tables = layout.results / "summary"
    runs = pd.read_csv(tables / "runs.csv")
    per_case = pd.read_csv(tables / "per_case.csv")
    assert len(runs) == 7 and len(per_case) == 7 * len(CASES)
    # the empty prediction's undefined HD95 counts as the worst case (100) in every table
    empty = per_case[(per_case.method == "supervised") & (per_case.seed == 0) & (per_case.case == "case00")]
    assert set(empty["hd95"]) == {100.0}
    missing = pd.read_csv(tables / "missing.csv")
    assert missing[["method", "ratio", "seed"]].values.tolist() == [["semi_agcl", 0.1, 1]]
    stats = pd.read_csv(tables / "stats.csv")
    dice_vs_agcl = stats[(stats.reference == "semi_agcl") & (stats.metric == "dice")
                         & (stats.ratio == 0.05)].iloc[0]
    assert dice_vs_agcl["method"] == "supervised" and dice_vs_agcl["n_cases"] == len(CASES)
    assert dice_vs_agcl["n_seeds"] == 2 and len(dice_vs_agcl["seed_diffs"].split(";")) == 2
    assert dice_vs_agcl["mean_diff"] < 0  # the fixture's semi_agcl is better
    # two seeds: neither a seed-level test nor a CI, and the note says why
    assert math.isnan(dice_vs_agcl["p_value"]) and math.isnan(dice_vs_agcl["ci_low"])
    assert "2 seed(s) < 3: no interval and no test" in dice_vs_agcl["note"]
    assert dice_vs_agcl["verdict"] == "no interval"
    # at 10 % semi_agcl has seed 0 only: the comparison pairs that seed
    at_10 = stats[(stats.reference == "supervised") & (stats.ratio == 0.1)].iloc[0]
    assert at_10["n_seeds"] == 1 and "seed(s) 1 present for one method only" in at_10["note"]
    assert (runs["amp"] == "bfloat16").all() and runs["noise_twin_of"].isna().all()
    published = pd.read_csv(tables / "published.csv")
    row = published[(published.method == "semi_agcl") & (published.ratio == 0.1)
                     & (published.dataset == "la")].iloc[0]
    assert row["dice_published"] == 90.33 and row["present"] == "both"


def test_report_renders_every_section_with_a_partial_grid(fixture_grid):
    config, _ = fixture_grid
    html = render_report(config).read_text()
    for anchor in ("tables", "label-efficiency", "per-case", "training", "statistics",
                   "published-checks", "provenance", "missing"):
        assert f'id="{anchor}"' in html
    assert 'id="table-la"' in html and 'id="stats-table"' in html
    # efficiency, per case, training, forest plot (no anchors logged: no Semi-AGCL curves)
    assert html.count("data:image/png;base64,") == 4 and 'id="forest-plot"' in html
    assert 'id="agcl-training"' not in html
    assert 'id="no-run-to-run"' in html and 'id="run-to-run-table"' not in html
    assert 'id="families-table"' in html and "float noise" not in html
    # the notes every comparison shares are written once, above the table, not on each row
    assert html.count("2 seed(s) &lt; 3: no interval and no test") == 1
    assert 'id="stats-shared-notes"' in html
    assert html.count("trained in bf16 autocast") >= 2  # main table and statistics
    assert "BCP paper&#39;s LA table is not in the material" in html
    assert "1 run(s) of the grid are not counted in any table" in html
    # semi_agcl at 10 % has one of its two seeds: the table says so beside the mean
    assert "ours over 1 of 2 seeds (see Missing runs)" in html
    assert 'id="reference-policy-warning"' in html  # one run used the upstream policy
    assert "90.33" in html  # the published Semi-AGCL LA 10% Dice beside ours
    assert 'id="synthetic-warning"' in html  # the fixture config says its LA is synthetic


def test_compute_table_beside_the_papers(fixture_grid):
    from agcl.report.published import load_published_compute
    from agcl.report.render import compute_rows

    config, layout = fixture_grid
    runs = pd.read_csv(layout.results / "summary" / "runs.csv")
    rows = {(r["dataset"], r["method"]): r
            for r in compute_rows(runs, load_published_compute(), config["methods"])}
    sup, agcl = rows[("la", "supervised")], rows[("la", "semi_agcl")]
    # supervised: 4 runs of 60 or 66 s -> 1.05 +- 0.06 min; semi_agcl: the 3 runs present
    # (5 %: seeds 0 and 1, 120 and 132 s; 10 %: seed 0, 120 s)
    assert sup["runs"] == 4 and sup["minutes"] == "1.05 ± 0.06" and sup["params"] == "9.44"
    assert agcl["runs"] == 3
    agcl_minutes = (120 + 132 + 120) / 3 / 60
    assert agcl["ratio"] == f"{agcl_minutes / 1.05:.2f}"
    assert (agcl["paper_params"], agcl["paper_minutes"]) == ("9.44", "48.6")
    assert agcl["paper_ratio"] == f"{48.6 / 36.5:.2f}"  # the paper's V-Net row is the base
    assert rows[("la", "arco")]["runs"] == 0 and rows[("la", "arco")]["minutes"] == "–"
    html = render_report(config).read_text()
    assert 'id="compute-table"' in html and "48.6" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium not installed")
def test_report_opens_in_a_headless_browser(fixture_grid, tmp_path):
    config, _ = fixture_grid
    page = render_report(config)
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
               page.resolve().as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count("<table") >= 3 and 'id="stats-table"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1400,2000", page.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    # The embedded figures decode in the browser: a copy of the page reports their pixel widths.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE_SCRIPT + "</body>"))
    dom = subprocess.run([*command[:-1], "--window-size=1400,2000", "--virtual-time-budget=5000",
                          probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    widths = json.loads(re.search(r'data-image-widths="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert len(widths) == 4 and all(w > 100 for w in widths)
    # At 1400 px the main tables are compact: no row wraps onto a second line, none is wider
    # than the window (one row per method and label ratio, 10 columns).
    tables = json.loads(re.search(r'data-tables="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert [t["id"] for t in tables] == ["table-la"]
    for table in tables:
        assert table["width"] <= 1400 - 32, table
        assert max(table["row_heights"]) <= 1.6 * min(table["row_heights"][2:]), table
    # the statistics table too: one line per comparison and metric (2 label ratios x Dice, HD95)
    stats = json.loads(re.search(r'data-stats-table="([^"]*)"', dom).group(1)
                       .replace("&quot;", '"'))
    assert stats["width"] <= 1400 - 32 and len(stats["row_heights"]) == 1 + 4, stats
    assert max(stats["row_heights"][1:]) <= 1.6 * min(stats["row_heights"][1:]), stats


PROBE_SCRIPT = """<script>window.addEventListener("load", () => {
  document.body.setAttribute("data-image-widths",
    JSON.stringify([...document.images].map(i => i.naturalWidth)));
  document.body.setAttribute("data-tables", JSON.stringify(
    [...document.querySelectorAll("table.paper-table")].map(t => ({
      id: t.id, width: t.getBoundingClientRect().width,
      row_heights: [...t.rows].map(r => r.getBoundingClientRect().height)}))));
  const stats = document.getElementById("stats-table");
  document.body.setAttribute("data-stats-table", JSON.stringify({
    width: stats.getBoundingClientRect().width,
    row_heights: [...stats.rows].map(r => r.getBoundingClientRect().height)}));
});</script>"""


def test_run_to_run_twins_and_semi_agcl_curves(tmp_path, monkeypatch):
    """A twin of supervised whose per-seed Dice moves by +1e-4 (seed 0) and -3e-4 (seed 1):
    run_to_run.csv has those differences on the per-seed scale and the share of supervised's
    seed-to-seed variance they explain; the twin is in no method table or comparison."""
    monkeypatch.chdir(tmp_path)
    config = fixture_config()
    config["noise_floor"] = {"methods": ["supervised"]}
    config["ratios"] = [0.1]
    layout = Layout(config)
    shift = {0: 1e-4, 1: -3e-4}
    for method in ("supervised", "semi_agcl", "supervised_ulp"):
        for seed in config["seeds"]:
            metrics = fake_metrics(method.removesuffix("_ulp"), 0.1, seed, "metrics_reloaded")
            if method.endswith("_ulp"):
                for rec in metrics["metric_per_case"]:
                    rec["dice"] += shift[seed]
            run = layout.run("la", method, 0.1, seed)
            write_evaluated_run(run, metrics, train_seconds=60, parameters=1, device="cpu",
                                amp="off" if seed == 0 else "bfloat16")
            log = {"step": [1, 2, 3], "loss": [1.0, 0.8, 0.5]}
            if method == "semi_agcl":
                log |= {"anchors_class0": [10, 12, 14], "anchors_class1": [3, 4, 6],
                        "queue_fill": [0.1, 0.5, 1.0]}
            pd.DataFrame(log).to_csv(run / "train_log.csv", index=False)
    aggregate(config)
    tables = layout.results / "summary"
    spread = pd.read_csv(tables / "run_to_run.csv")
    dice = spread[spread.metric == "dice"].iloc[0]
    assert (dice["twin"], dice["method"], dice["n_seeds"]) == ("supervised_ulp", "supervised", 2)
    rms = math.sqrt((1e-8 + 9e-8) / 2)
    assert dice["rms_diff"] == pytest.approx(rms, rel=1e-6)
    assert dice["se_of_mean"] == pytest.approx(rms / math.sqrt(2), rel=1e-6)
    per_case = pd.read_csv(tables / "per_case.csv")
    own = per_case[(per_case.method == "supervised") & (per_case["class"] != 0)]
    seed_sd = own.groupby(["seed", "case"])["dice"].mean().groupby("seed").mean().std()
    assert dice["seed_sd"] == pytest.approx(seed_sd, rel=1e-6)
    assert dice["chaos_share"] == pytest.approx(min(1.0, rms ** 2 / 2 / seed_sd ** 2), rel=1e-6)
    stats = pd.read_csv(tables / "stats.csv")
    assert "supervised_ulp" not in set(stats["method"]) | set(stats["reference"])
    for name in ("summary", "case_means"):
        assert "supervised_ulp" not in set(pd.read_csv(tables / f"{name}.csv")["method"])
    runs = pd.read_csv(tables / "runs.csv")
    assert runs.loc[runs.method == "supervised_ulp", "noise_twin_of"].eq("supervised").all()
    html = render_report(config).read_text()
    assert 'id="run-to-run-table"' in html and "supervised_ulp − supervised" in html
    assert f"{100 * rms:.2f}" in html  # RMS per seed of Dice in points
    assert "float noise" not in html and "noise floor" not in html.lower()
    assert 'id="agcl-training"' in html and html.count("data:image/png;base64,") == 5
    # one bf16 and one fp32 run per method: the tables say the precision is mixed
    assert "mixed: bf16 autocast (2 runs), fp32 (no autocast) (2 runs)" in html
    assert "supervised_ulp" not in html.split('id="run-to-run"')[0]  # nowhere before it


def test_stats_view_one_row_per_comparison_and_metric_with_shared_notes():
    from agcl.report.stats_view import stats_view

    def rec(reference, method, metric, diff, note, low=np.nan, high=np.nan, p=np.nan):
        return {"dataset": "la", "ratio": 0.05, "reference": reference, "method": method,
                "metric": metric, "n_seeds": 6, "mean_diff": diff, "ci_low": low,
                "ci_high": high, "p_holm": p, "note": note, "interval": "sign-flip inversion "
                "(exact)", "np_low": np.nan, "np_high": np.nan, "seeds_won": "5/6",
                "delta": 1.5, "median_case_diff": diff / 2, "verdict": "x"}

    shared = "1 case(s) undefined or not evaluated in some seed: left out"
    stats = pd.DataFrame([
        rec("supervised", "semi_agcl", "dice", 0.0123, shared, 0.001, 0.02, 0.03),
        rec("supervised", "semi_agcl", "hd95", -1.5, f"{shared}; 1 case(s) present for one "
            "method only: left out", 0.5, 2.0, 0.2),
        rec("supervised", "bcp", "dice", 0.004, shared, -0.01, 0.02, 0.5),
        rec("supervised", "bcp", "hd95", 0.2, shared),
        rec("semi_agcl", "supervised", "dice", -0.0123, shared),  # the mirror: not shown again
        rec("semi_agcl", "supervised", "hd95", 1.5, shared),
    ])
    view = stats_view(stats, ["la"], ["supervised", "bcp", "semi_agcl"])
    assert [(r["comparison"], r["metric"]) for r in view["rows"]] == [
        ("bcp − supervised", "DSC (points)"), ("bcp − supervised", "HD95"),
        ("semi_agcl − supervised", "DSC (points)"), ("semi_agcl − supervised", "HD95")]
    assert view["shared_notes"] == [shared]  # once, not on each row
    agcl_dice, agcl_hd95 = view["rows"][2], view["rows"][3]
    assert (agcl_dice["diff"], agcl_dice["ci"], agcl_dice["p"], agcl_dice["mark"]) == (
        "+1.23", "[+0.10, +2.00]", "0.030", "holm")  # Dice in percentage points
    assert agcl_dice["procedure"] == "sign-flip" and agcl_dice["median_case"] == ""
    # the bar clears 0 but Holm does not reject: marked as such, never as significant
    assert agcl_hd95["mark"] == "unadjusted" and agcl_hd95["median_case"] == "−0.75"
    assert view["rows"][0]["mark"] == "none" and view["rows"][1]["ci"] == "–"
    assert agcl_hd95["note"] == "1 case(s) present for one method only: left out"
    assert view["footnotes"] == [agcl_hd95["note"]] and agcl_hd95["mark_note"] == 1
    assert view["rows"][0]["span"] == 4 and agcl_dice["span"] == 0


def test_forest_plot_inputs():
    from agcl.report.forest import forest_plot

    spread = pd.DataFrame([{"dataset": "la", "ratio": 0.05, "twin": "supervised_ulp",
                            "method": "supervised", "metric": "dice",
                            "seed_diffs": "0:0.01;1:-0.02"}])
    assert forest_plot(pd.DataFrame(), spread, ["la"]) is None
    stats = pd.DataFrame([{"dataset": "la", "ratio": 0.05, "reference": "supervised",
                           "method": "semi_agcl", "metric": metric, "mean_diff": 0.01,
                           "ci_low": np.nan, "ci_high": np.nan, "p_holm": np.nan,
                           "np_low": np.nan, "np_high": np.nan, "seed_diffs": "0:0.02;1:0"}
                          for metric in ("dice", "hd95")])
    assert len(forest_plot(stats, spread, ["la", "acdc"])) > 1000  # a PNG, no CI needed
    assert len(forest_plot(stats, spread.iloc[:0], ["la"])) > 1000


def test_the_configs_roles_set_the_reports_references(tmp_path, monkeypatch):
    """roles: lower bound mean_teacher (its 100 % run, first row, compute base, reference),
    method of interest supervised (the other reference): semi_agcl, a reference by default,
    is only compared."""
    monkeypatch.chdir(tmp_path)
    config = fixture_config()
    config.update(methods=["supervised", "mean_teacher", "semi_agcl"], full_supervision=True,
                  roles={"lower_bound": "mean_teacher", "method_of_interest": "supervised"})
    config = validate_config(config)
    layout = Layout(config)
    for method in config["methods"]:
        for ratio in [*config["ratios"], *([1.0] if method == "mean_teacher" else [])]:
            for seed in config["seeds"]:
                write_evaluated_run(layout.run("la", method, ratio, seed),
                                    fake_metrics(method, ratio, seed, "metrics_reloaded"),
                                    train_seconds=60 * (1 + config["methods"].index(method)),
                                    parameters=1, device="cpu", amp="off")
    aggregate(config)
    tables = layout.results / "summary"
    assert pd.read_csv(tables / "missing.csv").empty  # the 100 % run is mean_teacher's
    runs = pd.read_csv(tables / "runs.csv")
    assert set(runs.loc[runs.ratio == 1.0, "method"]) == {"mean_teacher"}
    stats = pd.read_csv(tables / "stats.csv")
    assert set(stats["reference"]) == {"mean_teacher", "supervised"}
    html = render_report(config).read_text()
    assert "semi_agcl − mean_teacher" in html and "semi_agcl − supervised" in html
    assert "− semi_agcl" not in html
    assert "× mean_teacher" in html and "× supervised" not in html
    table = html.split('id="table-la"')[1].split("</table>")[0]
    assert table.index(">mean_teacher<") < table.index(">supervised<")  # the lower bound first
    from agcl.report.render import compute_rows

    rows = {r["method"]: r for r in compute_rows(runs, pd.DataFrame(
        columns=["dataset", "method", "parameters_m", "train_minutes", "source"]),
        config["methods"], config["roles"])}
    # the base of the ratios: mean_teacher's 120 s (supervised 60 s, semi_agcl 180 s)
    assert (rows["mean_teacher"]["ratio"], rows["supervised"]["ratio"],
            rows["semi_agcl"]["ratio"]) == ("1.00", "0.50", "1.50")


def test_an_eight_seed_tree_marks_agree_with_bars(tmp_path, monkeypatch):
    """8 seeds, four methods and run-to-run twins: every mark's colour follows its primary bar,
    and the page shows the new-patients bar, effect sizes, seeds needed and the twins."""
    monkeypatch.chdir(tmp_path)
    config = fixture_config()
    config.update(seeds=list(range(8)), ratios=[0.05],
                  methods=["supervised", "mean_teacher", "bcp", "semi_agcl"],
                  noise_floor={"methods": ["supervised"]})
    config = validate_config(config)
    layout = Layout(config)
    base = {"supervised": 0.70, "mean_teacher": 0.705, "bcp": 0.74, "semi_agcl": 0.80}
    for method in [*config["methods"], "supervised_ulp"]:
        for seed in config["seeds"]:
            name = method.removesuffix("_ulp")
            metrics = fake_metrics(name, 0.05, seed, "metrics_reloaded")
            rng = np.random.default_rng([seed, len(method)])
            shift = base[name] - 0.7 + rng.normal(0, 0.02)  # a per-run effect: seeds differ
            for rec in metrics["metric_per_case"]:
                rec["dice"] = float(np.clip(rec["dice"] + shift, 0, 1))
                rec["hd95"] = 10 * (1 - rec["dice"])
            write_evaluated_run(layout.run("la", method, 0.05, seed), metrics,
                                train_seconds=60, parameters=1, device="cpu", amp="off")
    aggregate(config)
    stats = pd.read_csv(layout.results / "summary" / "stats.csv")
    assert (stats["n_seeds"] == 8).all() and (stats["interval"] == "sign-flip inversion (exact)").all()
    excludes_zero = ~((stats["ci_low"] <= 0) & (0 <= stats["ci_high"]))
    assert ((stats["p_value"] < 0.05) == excludes_zero).all()
    assert (~(stats["p_holm"] < 0.05) | excludes_zero).all()  # a Holm mark always clears 0
    assert stats[["np_low", "np_high", "delta", "seeds_needed", "min_p_holm"]].notna().all().all()
    semi = stats[(stats.reference == "supervised") & (stats.method == "semi_agcl")
                 & (stats.metric == "dice")].iloc[0]
    assert semi["verdict"] == "better" and semi["seeds_won"] == "8/8"
    mt = stats[(stats.reference == "supervised") & (stats.method == "mean_teacher")
               & (stats.metric == "dice")].iloc[0]
    assert mt["verdict"] in ("inconclusive", "negligible", "better, not after Holm")
    html = render_report(config).read_text()
    assert 'class="mark-holm"' in html and 'class="mark-none"' in html
    assert "95% new patients" in html and 'id="case-floors"' in html
    assert 'id="families-table"' in html and 'id="run-to-run-table"' in html
    assert "RMS per seed" in html and "chaos share" in html and "float noise" not in html


def test_aggregate_refuses_a_folder_holding_another_run_or_another_recipe(tmp_path, monkeypatch):
    """A supervised r0.2 s1 model trained with --out into semi_agcl's r0.05 s0 folder is not
    counted as semi_agcl; nor is a run trained under settings the config no longer gives."""
    from agcl.config.recipe import resolve_recipe

    monkeypatch.chdir(tmp_path)
    config = fixture_config()
    config["methods"] = ["supervised", "mean_teacher"]
    config = validate_config(config)
    layout = Layout(config)
    now = resolve_recipe(config, "la", "supervised").settings_hash
    for method in config["methods"]:
        for ratio in config["ratios"]:
            for seed in config["seeds"]:
                meta = {"identity": {"settings_hash": now if method == "supervised" else None}}
                if (method, ratio, seed) == ("mean_teacher", 0.05, 0):
                    meta.update(method="supervised", ratio=0.2, seed=1)  # someone else's run
                if (method, ratio, seed) == ("supervised", 0.1, 1):
                    meta["identity"] = {"settings_hash": "0" * 16}  # an older recipe
                write_evaluated_run(layout.run("la", method, ratio, seed),
                                    fake_metrics(method, ratio, seed, "metrics_reloaded"),
                                    train_seconds=60, parameters=1, device="cpu", amp="off",
                                    **meta)
    aggregate(config)
    missing = pd.read_csv(layout.results / "summary" / "missing.csv").set_index(
        ["method", "ratio", "seed"])["reason"]
    assert len(missing) == 2
    assert missing[("mean_teacher", 0.05, 0)].startswith(
        "this folder holds another run (method 'supervised' (expected 'mean_teacher'), ratio 0.2 "
        "(expected 0.05), seed 1 (expected 0))")
    assert "trained under other settings than the config now gives" in \
        missing[("supervised", 0.1, 1)]
    runs = pd.read_csv(layout.results / "summary" / "runs.csv")
    assert len(runs) == 2 * 2 * 2 - 2
