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

from agcl.config import Layout, expected_runs
from agcl.report import figures
from agcl.report.published import (
    dice_jaccard_consistency,
    load_published,
    load_published_compute,
)
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


# Higher is better for the overlap metrics, lower for the distances.
BETTER = {"dice": max, "jaccard": max, "hd95": min, "asd": min}
PRIMARY_SOURCE = "Semi-AGCL paper"  # the paper this kit replicates: its value sits beside ours


def _method_rank(methods: list[str] | None):
    """Sort key for method names: supervised first (as the paper), then the config's order,
    then any other (published-only) method by name."""
    order = {m: i for i, m in enumerate(dict.fromkeys(["supervised", *(methods or [])]))}
    return lambda method: (order.get(method, len(order)), method)


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
                methods: list[str] | None = None) -> dict[str, dict]:
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
                values = " / ".join(_num(other[f"{m}_published"]) for m in METRIC_TITLES)
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
                              "ours_value": ours, "theirs": _num(theirs), "theirs_value": theirs})
            row = {"method": method, "labels": f"{100 * ratio:g}%", "cells": cells,
                   "marks": marks, "flagged": bool(flags)}
            (ours_rows if with_ours else published_rows).append(row)
        # the config's method order within each label ratio (supervised first, as the paper)
        rank = _method_rank(methods)
        ours_rows.sort(key=lambda r: (float(r["labels"][:-1]), *rank(r["method"])))
        _mark_best(ours_rows, "ours")
        _mark_best(ours_rows + published_rows, "theirs")
        tables[dataset] = {"ours": ours_rows, "published_only": published_rows,
                           "notes": notes}
    return tables


def compute_rows(runs: pd.DataFrame, published: pd.DataFrame, methods: list[str]) -> list[dict]:
    """Per dataset x method: parameters of the evaluated network and training wall time (mean ±
    std over its semi-supervised runs; the 100 % bound excluded), each also as a ratio to
    supervised, beside the paper's compute table where it has the row."""
    rows = []
    ours = runs[runs["ratio"] < 1] if not runs.empty and "train_seconds" in runs else pd.DataFrame()
    keys = set()
    if not ours.empty:
        keys |= set(map(tuple, ours[["dataset", "method"]].drop_duplicates().values))
    keys |= set(map(tuple, published[["dataset", "method"]].values))
    rank = _method_rank(methods)
    for dataset, method in sorted(keys, key=lambda k: (k[0], *rank(k[1]))):
        mine = ours[(ours["dataset"] == dataset) & (ours["method"] == method)] if len(ours) else ours
        base = ours[(ours["dataset"] == dataset) & (ours["method"] == "supervised")] \
            if len(ours) else ours
        theirs = published[(published["dataset"] == dataset) & (published["method"] == method)]
        their_base = published[(published["dataset"] == dataset)
                               & (published["method"] == "supervised")]
        minutes = mine["train_seconds"].mean() / 60 if len(mine) else math.nan
        base_minutes = base["train_seconds"].mean() / 60 if len(base) else math.nan
        paper = theirs.iloc[0] if len(theirs) else None
        paper_base = their_base.iloc[0]["train_minutes"] if len(their_base) else math.nan
        rows.append({
            "dataset": dataset, "method": method,
            "runs": len(mine),
            "params": _num(mine["parameters"].iloc[0] / 1e6) if len(mine) else "–",
            "minutes": _mean_std(minutes, mine["train_seconds"].std() / 60 if len(mine) else math.nan),
            "ratio": _num(minutes / base_minutes),
            "device": ", ".join(sorted(mine["device"].dropna().astype(str).unique()))
            if len(mine) else "",
            "paper_params": _num(paper["parameters_m"]) if paper is not None else "–",
            "paper_minutes": _num(paper["train_minutes"], 1) if paper is not None else "–",
            "paper_ratio": _num(paper["train_minutes"] / paper_base) if paper is not None else "–",
            "paper_source": f"{paper['source']}" if paper is not None else "",
        })
    return rows


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
    compute_published = load_published_compute()
    html = env.get_template("index.html.j2").render(
        name=config["name"],
        synthetic=synthetic,
        metric_titles=list(METRIC_TITLES.values()),
        main_tables=main_tables(published[published["dataset"].isin(datasets)] if len(published)
                                else published, ratios, methods),
        label_efficiency=figures.label_efficiency(runs, methods, datasets),
        per_case=figures.per_case_distribution(case_means, methods, datasets),
        training=figures.training_curves(training_logs(config, layout), methods, datasets),
        overlays=overlays(config, layout, case_means),
        stats=stats_rows(stats),
        compute=compute_rows(runs, compute_published[compute_published["dataset"].isin(datasets)],
                             methods),
        missing=missing.to_dict("records"),
        reference_policy_runs=len(reference_policy_runs),
        inconsistent=inconsistent.to_dict("records"),
        provenance=provenance,
        config_json=json.dumps(config, indent=2, sort_keys=True),
    )
    out = Path(out) if out else layout.report / "index.html"
    write_text(out, html)
    return out
