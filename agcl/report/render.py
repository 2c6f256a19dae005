"""Aggregated tables -> one self-contained HTML page (Jinja2; seaborn figures embedded as PNG).

Everything shown is read from the tables `agcl aggregate` wrote (and, for training curves and
overlays, from the run folders), so the page can be rebuilt at any time and renders a partial
grid, listing what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from agcl.config import Layout, expected_runs
from agcl.report import figures
from agcl.report.published import dice_jaccard_consistency, load_published
from agcl.runfolder import LOG_CSV
from agcl.utils import code_version, write_text

PROTOCOLS = {
    "unified": "unified: one training recipe per dataset for every method (the fair comparison)",
    "reference": "reference: each method trained with its own published recipe (to check it "
                 "against its own paper)",
}
METRIC_TITLES = {"dice": "DSC %", "jaccard": "Jaccard %", "hd95": "HD95", "asd": "ASD"}


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `agcl aggregate` first")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _num(value, digits: int = 2) -> str:
    return "–" if pd.isna(value) else f"{value:.{digits}f}"


def _mean_std(mean, std) -> str:
    if pd.isna(mean):
        return "–"
    return _num(mean) if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def paper_tables(published: pd.DataFrame, ratios: list[float]) -> dict[str, list[dict]]:
    """Per dataset: our mean ± std beside the published number and the difference."""
    if published.empty:
        return {}
    shown = published[published["ratio"].round(6).isin([round(r, 6) for r in ratios])]
    tables = {}
    for dataset, part in shown.groupby("dataset", sort=False):
        rows = []
        for rec in part.sort_values(["ratio", "method"]).to_dict("records"):
            flags = [rec["flag"]] if isinstance(rec["flag"], str) and rec["flag"] else []
            seeds, expected = rec.get("n_seeds"), rec.get("n_expected_seeds")
            if not pd.isna(seeds) and not pd.isna(expected) and seeds < expected:
                flags.insert(0, f"ours over {int(seeds)} of {int(expected)} seeds (see Missing runs)")
            row = {"method": rec["method"], "labels": f"{100 * rec['ratio']:g}%",
                   "source": rec["source"] if isinstance(rec["source"], str) else "",
                   "flag": "; ".join(flags), "present": rec["present"], "cells": []}
            for m in METRIC_TITLES:
                row["cells"].append({"ours": _mean_std(rec[f"{m}_ours"], rec[f"{m}_ours_std"]),
                                     "theirs": _num(rec[f"{m}_published"]),
                                     "diff": _num(rec[f"{m}_diff"])})
            rows.append(row)
        tables[dataset] = rows
    return tables


def stats_rows(stats: pd.DataFrame) -> list[dict]:
    if stats.empty:
        return []
    rows = []
    for rec in stats.sort_values(["dataset", "ratio", "reference", "metric", "method"]).to_dict("records"):
        rows.append({
            "dataset": rec["dataset"], "labels": f"{100 * rec['ratio']:g}%",
            "comparison": f"{rec['method']} − {rec['reference']}", "metric": rec["metric"],
            "n": int(rec["n_cases"]), "diff": _num(rec["mean_diff"], 4),
            "ci": "–" if pd.isna(rec["ci_low"]) else f"[{rec['ci_low']:.4f}, {rec['ci_high']:.4f}]",
            "p": _num(rec["p_value"], 4), "p_holm": _num(rec["p_holm"], 4),
            "note": rec["note"] if isinstance(rec["note"], str) else "",
        })
    return rows


def training_logs(config: dict, layout: Layout) -> pd.DataFrame:
    frames = []
    for dataset, method, ratio, seed in expected_runs(config):
        path = layout.run(dataset, method, ratio, seed) / LOG_CSV
        if path.exists():
            log = pd.read_csv(path)
            frames.append(log.assign(dataset=dataset, method=method, seed=seed,
                                     labels=f"{100 * float(ratio):g}%"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def overlays(config: dict, layout: Layout, case_means: pd.DataFrame) -> list[dict]:
    """Best / median / worst test cases at the smallest labeled fraction, seed 0 predictions."""
    if case_means.empty:
        return []
    rank_method = "semi_agcl" if "semi_agcl" in config["methods"] else config["methods"][0]
    ratio = min(config["ratios"])
    seed = config["seeds"][0]
    out = []
    for dataset in config["datasets"]:
        runs = {m: layout.run(dataset, m, ratio, seed) for m in config["methods"]}
        image = figures.qualitative_overlays(case_means, dataset, ratio, runs,
                                             layout.processed(dataset), rank_method)
        if image:
            out.append({"dataset": dataset, "labels": f"{100 * ratio:g}%", "seed": seed,
                        "rank_method": rank_method, "png": image})
    return out


def render_report(config: dict, out: str | Path | None = None, root: str | Path = ".") -> Path:
    layout = Layout(config, root)
    tables = layout.results / "summary"
    runs, missing, case_means, stats, published = (
        _read(tables / f"{name}.csv") for name in ("runs", "missing", "case_means", "stats",
                                                   "published"))
    ratios = sorted(set(config["ratios"]) | ({1.0} if config["full_supervision"] else set()))
    reference_policy_runs = (runs[runs["empty_policy"] == "reference"] if not runs.empty
                             else runs)
    inconsistent = dice_jaccard_consistency(load_published())
    inconsistent = inconsistent[~inconsistent["dice_jaccard_consistent"]]
    provenance = {
        "selection": sorted(runs["selection"].dropna().unique()) if not runs.empty else [],
        "units": sorted(runs["units"].dropna().unique()) if not runs.empty else [],
        "empty_policy": sorted(runs["empty_policy"].dropna().unique()) if not runs.empty else [],
        "code_versions": sorted(runs["code_version"].dropna().unique()) if not runs.empty else [],
        "report_code_version": code_version(),
        "seeds": config["seeds"],
        "protocol": PROTOCOLS[config["protocol"]],
        "n_runs": len(runs),
        "n_expected": len(expected_runs(config)),
    }
    env = Environment(loader=PackageLoader("agcl.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    synthetic = sorted(d for d, c in config["datasets"].items() if c["source"] == "synthetic")
    methods, datasets = list(config["methods"]), list(config["datasets"])
    html = env.get_template("index.html.j2").render(
        name=config["name"],
        synthetic=synthetic,
        metric_titles=list(METRIC_TITLES.values()),
        paper_tables=paper_tables(published, ratios),
        label_efficiency=figures.label_efficiency(runs, methods, datasets),
        per_case=figures.per_case_distribution(case_means, methods, datasets),
        training=figures.training_curves(training_logs(config, layout), methods, datasets),
        overlays=overlays(config, layout, case_means),
        stats=stats_rows(stats),
        missing=missing.to_dict("records"),
        reference_policy_runs=len(reference_policy_runs),
        inconsistent=inconsistent.to_dict("records"),
        provenance=provenance,
        config_json=json.dumps(config, indent=2, sort_keys=True),
    )
    out = Path(out) if out else layout.report / "index.html"
    write_text(out, html)
    return out
