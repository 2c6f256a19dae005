"""Aggregated tables -> one self-contained HTML page (Jinja2; seaborn figures embedded as PNG).

Everything shown is read from the tables `agcl aggregate` wrote (and, for training curves and
overlays, from the run folders), so the page can be rebuilt at any time and renders a partial
grid, listing what is missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from agcl.common.utils import code_version, write_text
from agcl.config import Layout, expected_runs, noise_twins, roles_of
from agcl.eval.metric_table import TABLE
from agcl.report import figures
from agcl.report.aggregate import methods_only
from agcl.report.forest import forest_plot
from agcl.report.format import lower_bound, method_rank, num
from agcl.report.published import (
    dice_jaccard_consistency,
    load_published,
    load_published_compute,
)
from agcl.report.stats_view import case_floors, family_rows, run_to_run_rows, stats_view
from agcl.runtime.runfolder import LOG_CSV

PROTOCOLS = {
    "unified": "unified: one training recipe per dataset for every method (the fair comparison)",
    "reference": "reference: each method trained with its own published recipe (to check it "
                 "against its own paper)",
}
BCP_LA_NOTE = ("bcp: no published LA values entered. The BCP paper's LA table is not in the "
               "material this project was given, and the BCP repository's README has no table.")
METRIC_TITLES = {name: m.title for name, m in TABLE.items()}


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `agcl aggregate` first")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _mean_std(mean, std) -> str:
    if pd.isna(mean):
        return "–"
    return num(mean) if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


# Higher is better for the overlap metrics, lower for the distances.
BETTER = {name: max if m.higher_is_better else min for name, m in TABLE.items()}
PRIMARY_SOURCE = "Semi-AGCL paper"  # the paper this kit replicates: its value sits beside ours


def _source_order(sources) -> list[str]:
    unique = list(dict.fromkeys(s for s in sources if isinstance(s, str) and s))
    return sorted(unique, key=lambda s: (not s.startswith(PRIMARY_SOURCE), unique.index(s)))


def _mark_best(rows: list[dict], field: str) -> None:
    """Flag the best value of each metric column within each label ratio."""
    for labels in {r["labels"] for r in rows}:
        group = [r for r in rows if r["labels"] == labels]
        for index, metric in enumerate(METRIC_TITLES):
            values = [r["cells"][index][f"{field}_value"] for r in group]
            finite = [v for v in values if not pd.isna(v)]
            if len(finite) < 2:
                continue
            best = BETTER[metric](finite)
            for r, v in zip(group, values):
                r["cells"][index][f"{field}_best"] = not pd.isna(v) and v == best


def main_tables(published: pd.DataFrame, ratios: list[float],
                methods: list[str] | None = None, roles: dict | None = None) -> dict[str, dict]:
    """Per dataset, the paper-style table: one row per method and label ratio with our mean ±
    std and one published value beside each metric (the Semi-AGCL paper's where it has one),
    every source a numbered footnote, methods with published numbers only in their own block,
    the best value of each column marked within each label ratio."""
    if published.empty:
        return {}
    shown = published[published["ratio"].round(6).isin([round(r, 6) for r in ratios])]
    tables = {}
    for dataset, part in shown.groupby("dataset", sort=False):
        sources = _source_order(part["source"])
        number = {source: i + 1 for i, source in enumerate(sources)}
        notes: list[str] = list(sources)
        ours_rows, published_rows = [], []
        for (ratio, method), group in part.groupby(["ratio", "method"], sort=True):
            records = sorted(group.to_dict("records"),
                             key=lambda r: number.get(r["source"], len(number) + 1))
            with_ours = [r for r in records if r["present"] != "published_only"]
            with_theirs = [r for r in records if r["present"] != "ours_only"]
            first = with_ours[0] if with_ours else records[0]
            shown_theirs = with_theirs[0] if with_theirs else None
            marks = [number[shown_theirs["source"]]] if shown_theirs is not None else []
            for other in with_theirs[1:]:  # further sources: their values in a footnote
                values = " / ".join(num(other[f"{m}_published"]) for m in METRIC_TITLES)
                notes.append(f"{method} {100 * ratio:g}% in {other['source']}: {values} "
                             f"({' / '.join(METRIC_TITLES.values())})")
                marks.append(len(notes))
            flags = [r["flag"] for r in records if isinstance(r["flag"], str) and r["flag"]]
            seeds, expected = first.get("n_seeds"), first.get("n_expected_seeds")
            if with_ours and not pd.isna(seeds) and not pd.isna(expected) and seeds < expected:
                flags.insert(0, f"ours over {int(seeds)} of {int(expected)} seeds "
                                "(see Missing runs)")
            for flag in dict.fromkeys(flags):
                notes.append(f"{method} {100 * ratio:g}%: {flag}")
                marks.append(len(notes))
            cells = []
            for m in METRIC_TITLES:
                ours = first[f"{m}_ours"] if with_ours else math.nan
                theirs = shown_theirs[f"{m}_published"] if shown_theirs is not None else math.nan
                cells.append({"ours": _mean_std(ours, first[f"{m}_ours_std"] if with_ours
                                                else math.nan),
                              "ours_value": ours, "theirs": num(theirs), "theirs_value": theirs})
            row = {"method": method, "labels": f"{100 * ratio:g}%", "cells": cells,
                   "marks": marks, "flagged": bool(flags)}
            (ours_rows if with_ours else published_rows).append(row)
        # the config's method order within each label ratio (the lower bound first, as the paper)
        rank = method_rank(methods, roles)
        ours_rows.sort(key=lambda r: (float(r["labels"][:-1]), *rank(r["method"])))
        _mark_best(ours_rows, "ours")
        _mark_best(ours_rows + published_rows, "theirs")
        tables[dataset] = {"ours": ours_rows, "published_only": published_rows,
                           "notes": notes}
    return tables


def compute_rows(runs: pd.DataFrame, published: pd.DataFrame, methods: list[str],
                 roles: dict | None = None) -> list[dict]:
    """Per dataset x method: parameters of the evaluated network and training wall time (mean ±
    std over its semi-supervised runs; the 100 % bound excluded), each also as a ratio to the
    lower bound's (roles; the published ratio to its published row), beside the paper's compute
    table where it has the row. No lower bound: no ratios."""
    rows = []
    ours = runs[runs["ratio"] < 1] if not runs.empty and "train_seconds" in runs else pd.DataFrame()
    keys = set()
    if not ours.empty:
        keys |= set(map(tuple, ours[["dataset", "method"]].drop_duplicates().values))
    keys |= set(map(tuple, published[["dataset", "method"]].values))
    rank = method_rank(methods, roles)
    lower = lower_bound(roles)
    for dataset, method in sorted(keys, key=lambda k: (k[0], *rank(k[1]))):
        mine = ours[(ours["dataset"] == dataset) & (ours["method"] == method)] if len(ours) else ours
        base = ours[(ours["dataset"] == dataset) & (ours["method"] == lower)] \
            if len(ours) else ours
        theirs = published[(published["dataset"] == dataset) & (published["method"] == method)]
        their_base = published[(published["dataset"] == dataset)
                               & (published["method"] == lower)]
        minutes = mine["train_seconds"].mean() / 60 if len(mine) else math.nan
        base_minutes = base["train_seconds"].mean() / 60 if len(base) else math.nan
        paper = theirs.iloc[0] if len(theirs) else None
        paper_base = their_base.iloc[0]["train_minutes"] if len(their_base) else math.nan
        rows.append({
            "dataset": dataset, "method": method,
            "runs": len(mine),
            "params": num(mine["parameters"].iloc[0] / 1e6) if len(mine) else "–",
            "trained_params": num(mine["trained_parameters"].iloc[0] / 1e6)
            if len(mine) and "trained_parameters" in mine else "–",
            "minutes": _mean_std(minutes, mine["train_seconds"].std() / 60 if len(mine) else math.nan),
            "ratio": num(minutes / base_minutes),
            "device": ", ".join(sorted(mine["device"].dropna().astype(str).unique()))
            if len(mine) else "",
            "precision": precision_text(mine) if len(mine) else "",
            "paper_params": num(paper["parameters_m"]) if paper is not None else "–",
            "paper_minutes": num(paper["train_minutes"], 1) if paper is not None else "–",
            "paper_ratio": num(paper["train_minutes"] / paper_base) if paper is not None else "–",
            "paper_source": f"{paper['source']}" if paper is not None else "",
        })
    return rows


AMP_TEXT = {"bfloat16": "bf16 autocast", "float16": "fp16 autocast", "off": "fp32 (no autocast)"}


def precision_text(runs: pd.DataFrame) -> str:
    """How the runs behind a table were trained (run.json `amp`): one precision, or mixed."""
    if runs.empty:
        return "no runs"
    amp = runs["amp"] if "amp" in runs else pd.Series("", index=runs.index)
    counts = amp.map(lambda a: "not recorded" if pd.isna(a) or a == "" else AMP_TEXT.get(a, a))
    counts = counts.value_counts(sort=False)
    if len(counts) == 1:
        return f"trained in {counts.index[0]}"
    return "mixed: " + ", ".join(f"{name} ({n} runs)" for name, n in counts.sort_index().items())


def precision_by_dataset(runs: pd.DataFrame, datasets: list[str]) -> dict[str, str]:
    if runs.empty:
        return {}
    return {d: precision_text(runs[runs["dataset"] == d]) for d in datasets
            if (runs["dataset"] == d).any()}


def training_logs(config: dict, layout: Layout) -> pd.DataFrame:
    frames = []
    for dataset, method, ratio, seed in expected_runs(config):
        if method not in config["methods"]:
            continue  # a noise-floor twin: not a method
        path = layout.run(dataset, method, ratio, seed) / LOG_CSV
        if path.exists():
            log = pd.read_csv(path)
            frames.append(log.assign(dataset=dataset, method=method, seed=seed,
                                     labels=f"{100 * float(ratio):g}%"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def overlays(config: dict, layout: Layout, case_means: pd.DataFrame) -> list[dict]:
    """Best / median / worst test cases (by the method of interest's Dice) at the smallest
    labeled fraction, seed 0 predictions."""
    if case_means.empty:
        return []
    rank_method = roles_of(config)["method_of_interest"]
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
    all_runs, missing, case_means, stats, published, spread = (
        _read(tables / f"{name}.csv") for name in ("runs", "missing", "case_means", "stats",
                                                   "published", "run_to_run"))
    runs = methods_only(all_runs)
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
        "n_runs": len(all_runs),
        "n_expected": len(expected_runs(config)),
    }
    env = Environment(loader=PackageLoader("agcl.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    synthetic = sorted(d for d, c in config["datasets"].items() if c["source"] == "synthetic")
    methods, datasets = list(config["methods"]), list(config["datasets"])
    compute_published = load_published_compute()
    grid = roles_of(config)
    tables_shown = main_tables(published[published["dataset"].isin(datasets)] if len(published)
                               else published, ratios, methods, grid)
    bcp_la = published[(published["dataset"] == "la") & (published["method"] == "bcp")
                       & (published["present"] != "ours_only")] if len(published) else published
    if "la" in tables_shown and bcp_la.empty:
        tables_shown["la"]["notes"].append(BCP_LA_NOTE)
    logs = training_logs(config, layout)
    rank = method_rank(methods, grid)
    twins = noise_twins(config)
    html = env.get_template("index.html.j2").render(
        name=config["name"],
        synthetic=synthetic,
        metric_titles=list(METRIC_TITLES.values()),
        main_tables=tables_shown,
        precision=precision_by_dataset(runs, datasets),
        noise_precision=precision_by_dataset(all_runs[all_runs["method"].isin(twins)]
                                             if len(all_runs) else all_runs, datasets),
        label_efficiency=figures.label_efficiency(runs, methods, datasets),
        per_case=figures.per_case_distribution(case_means, methods, datasets),
        training=figures.training_curves(logs, methods, datasets),
        agcl_training=figures.agcl_curves(logs, datasets, grid["method_of_interest"]),
        overlays=overlays(config, layout, case_means),
        stats=stats_view(stats, datasets, methods, grid),
        forest=forest_plot(stats, spread, datasets, rank),
        families=family_rows(stats, datasets),
        case_floors=case_floors(stats, datasets),
        run_to_run=run_to_run_rows(spread, datasets),
        twin_methods=sorted(set(twins.values())),
        compute=compute_rows(runs, compute_published[compute_published["dataset"].isin(datasets)],
                             methods, grid),
        lower_bound=grid["lower_bound"],
        method_of_interest=grid["method_of_interest"],
        missing=missing.to_dict("records"),
        smoke_steps=config.get("smoke_steps"),
        skipped_runs=(all_runs[all_runs["skipped_steps"] > 0].to_dict("records")
                      if "skipped_steps" in all_runs else []),
        reference_policy_runs=len(reference_policy_runs),
        inconsistent=inconsistent.to_dict("records"),
        provenance=provenance,
        config_json=json.dumps(config, indent=2, sort_keys=True),
    )
    out = Path(out) if out else layout.report / "index.html"
    write_text(out, html)
    return out
