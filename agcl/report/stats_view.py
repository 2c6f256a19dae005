"""The statistics section of the report, as rows for its template: the comparisons
(stats.csv), the comparison families and the seeds they need, the case floor per dataset and
the run-to-run spread (run_to_run.csv). Read from the tables `agcl aggregate` wrote."""

from __future__ import annotations

import math
import re

import pandas as pd

from agcl.eval.metric_table import TABLE, points_label
from agcl.report.format import method_rank, num, p_text, signed
from agcl.report.intervals import seeds_needed, smallest_attainable_p_holm
from agcl.report.stats import mark

SEED_COUNT_NOTE = re.compile(r"\d+ seed\(s\) < \d+: |no new-patients interval")
STATS_METRICS = {name: (points_label(m), m.scale) for name, m in TABLE.items() if m.compared}
INTERVAL_TEXT = {"sign-flip inversion (exact)": "sign-flip",
                 "sign-flip inversion (Monte Carlo)": "sign-flip (MC)",
                 "t over per-seed means (assumes normal per-seed means)": "t"}


def _interval_text(low, high, scale: float) -> str:
    return "–" if pd.isna(low) or pd.isna(high) else \
        f"[{signed(low, scale)}, {signed(high, scale)}]"


def stats_view(stats: pd.DataFrame, datasets: list[str], methods: list[str] | None = None,
               roles: dict | None = None) -> dict:
    """The statistics table: one row per comparison and metric (Dice in percentage points):
    mean difference, the primary interval on this test set with its procedure, Holm's p, the
    new-patients interval, seeds won, delta, the median per-case difference and the verdict;
    notes every row shares written once (`shared_notes`), a row's own notes beside it. Of a pair
    compared both ways only the first in method order is shown."""
    view = {"rows": [], "shared_notes": [], "footnotes": []}
    if stats.empty:
        return view
    shown = stats[stats["metric"].isin(STATS_METRICS)]
    rank = method_rank(methods, roles)
    where = {d: i for i, d in enumerate(datasets)}
    order = {m: i for i, m in enumerate(STATS_METRICS)}
    records = sorted(shown.to_dict("records"), key=lambda r: (
        where.get(r["dataset"], len(where)), r["ratio"], *rank(r["reference"]),
        *rank(r["method"]), order[r["metric"]]))
    rows, row_notes, seen = [], [], {}
    for rec in records:
        pair = (rec["dataset"], rec["ratio"], frozenset((rec["reference"], rec["method"])))
        first = seen.setdefault(pair, (rec["reference"], rec["method"]))
        if first != (rec["reference"], rec["method"]):
            continue  # b − a is a − b negated (mirrored intervals, same p): shown once
        title, scale = STATS_METRICS[rec["metric"]]
        state = mark(rec["p_holm"], rec["ci_low"], rec["ci_high"])
        rows.append({
            "dataset": rec["dataset"], "labels": f"{100 * rec['ratio']:g}%",
            "comparison": f"{rec['method']} − {rec['reference']}", "metric": title,
            "seeds": int(rec["n_seeds"]), "diff": signed(rec["mean_diff"], scale),
            "ci": _interval_text(rec["ci_low"], rec["ci_high"], scale),
            "procedure": INTERVAL_TEXT.get(rec.get("interval"), "")
            if isinstance(rec.get("interval"), str) else "",
            "p": p_text(rec["p_holm"]), "mark": state,
            "new": _interval_text(rec.get("np_low"), rec.get("np_high"), scale),
            "won": rec.get("seeds_won") if isinstance(rec.get("seeds_won"), str) else "–",
            "delta": num(rec.get("delta")),
            "median_case": signed(rec.get("median_case_diff"), scale)
            if rec["metric"] == "hd95" else "",
            "verdict": rec.get("verdict") if isinstance(rec.get("verdict"), str) else "",
        })
        row_notes.append([n for n in (rec["note"].split("; ") if isinstance(rec["note"], str)
                                      else []) if n])
    by_count = [n for notes in row_notes for n in notes if SEED_COUNT_NOTE.match(n)]
    shared = set.intersection(*(set(n) for n in row_notes)) if row_notes else set()
    footnotes: list[str] = []  # a row's own notes, numbered under the table (one line a row)
    for row, notes in zip(rows, row_notes):
        row["note"] = "; ".join(n for n in notes if n not in shared
                                and not SEED_COUNT_NOTE.match(n))
        if row["note"] and row["note"] not in footnotes:
            footnotes.append(row["note"])
        row["mark_note"] = footnotes.index(row["note"]) + 1 if row["note"] else None
    view["footnotes"] = footnotes
    view["shared_notes"] = list(dict.fromkeys(
        [*(n for n in row_notes[0] if n in shared and not SEED_COUNT_NOTE.match(n)),
         *sorted(set(by_count), key=by_count.index)])) if row_notes else []
    for i, row in enumerate(rows):  # the dataset and label cells span their block
        block = (row["dataset"], row["labels"])
        first = i == 0 or (rows[i - 1]["dataset"], rows[i - 1]["labels"]) != block
        row["span"] = sum(1 for r in rows[i:] if (r["dataset"], r["labels"]) == block) if first else 0
    view["rows"] = rows
    return view


def family_rows(stats: pd.DataFrame, datasets: list[str]) -> list[dict]:
    """Per comparison family (dataset x labels x reference x metric): tests in it, seeds, the
    smallest p_holm any of its rows could reach, the per-seed sd (median over its rows), the
    smallest effect worth detecting and the seeds needed for 80 % power to detect it at that sd
    under Holm."""
    if stats.empty or "family_size" not in stats:
        return []
    where = {d: i for i, d in enumerate(datasets)}
    rows = []
    shown = stats[stats["metric"].isin(STATS_METRICS)]
    for (dataset, ratio, reference, metric), g in sorted(
            shown.groupby(["dataset", "ratio", "reference", "metric"], sort=False),
            key=lambda item: (where.get(item[0][0], len(where)), *item[0][1:])):
        _, scale = STATS_METRICS[metric]
        size = int(g["family_size"].max()) if g["family_size"].notna().any() else 0
        seeds = int(g["n_seeds"].max())
        sd = float(g["seed_sd"].median()) if g["seed_sd"].notna().any() else math.nan
        effect = float(g["smallest_effect"].iloc[0]) if g["smallest_effect"].notna().any() \
            else math.nan
        floor = smallest_attainable_p_holm(seeds, size)
        needed = seeds_needed(effect / sd, max(size, 1)) if sd > 0 and effect > 0 else math.nan
        rows.append({
            "dataset": dataset, "labels": f"{100 * ratio:g}%", "reference": reference,
            "metric": STATS_METRICS[metric][0], "tests": size, "seeds": seeds,
            "min_p": "–" if pd.isna(floor) else ("no floor (t)" if floor == 0
                                                 else p_text(floor)),
            "can_conclude": not pd.isna(floor) and floor < 0.05,
            "seed_sd": num(sd * scale), "effect": num(effect * scale),
            "needed": "–" if pd.isna(needed) else ("> 10000" if math.isinf(needed)
                                                   else str(int(needed))),
        })
    return rows


def case_floors(stats: pd.DataFrame, datasets: list[str]) -> list[dict]:
    """Per dataset, the half-width no number of seeds removes from a new-patients interval of a
    Dice difference: 1.96 sd_case / sqrt(C), median over the comparisons."""
    if stats.empty or "case_floor" not in stats:
        return []
    dice = stats[(stats["metric"] == "dice") & stats["case_floor"].notna()]
    out = []
    for dataset in datasets:
        part = dice[dice["dataset"] == dataset]
        if len(part):
            out.append({"dataset": dataset, "cases": int(part["n_cases"].median()),
                        "sd_case": num(100 * part["sd_case"].median()),
                        "floor": num(100 * part["case_floor"].median())})
    return out


def run_to_run_rows(spread: pd.DataFrame, datasets: list[str]) -> list[dict]:
    """The run-to-run table (run_to_run.csv): per dataset x labels x twin pair and metric, the
    RMS of the per-seed twin − method differences (the per-seed scale of the forest plot's grey
    dots), its standard error on the scale of a mean over the seeds, and the share of the
    method's seed-to-seed variance that this chaos explains."""
    if spread.empty:
        return []
    where = {d: i for i, d in enumerate(datasets)}
    rows = []
    groups = spread.groupby(["dataset", "ratio", "twin", "method"], sort=False)
    for (dataset, ratio, twin, method), g in sorted(
            groups, key=lambda item: (where.get(item[0][0], len(where)), *item[0][1:])):
        by_metric = g.set_index("metric")
        cells = []
        for metric, (_, scale) in STATS_METRICS.items():
            rec = by_metric.loc[metric] if metric in by_metric.index else None
            cells.append({
                "rms": "–" if rec is None else num(scale * rec["rms_diff"]),
                "se": "–" if rec is None else num(scale * rec["se_of_mean"]),
                "share": "–" if rec is None or pd.isna(rec["chaos_share"])
                else f"{100 * rec['chaos_share']:.0f}%"})
        notes = [n for n in g["note"] if isinstance(n, str) and n]
        rows.append({"dataset": dataset, "labels": f"{100 * ratio:g}%",
                     "pair": f"{twin} − {method}", "seeds": int(g["n_seeds"].max()),
                     "cells": cells, "note": "; ".join(dict.fromkeys(notes))})
    return rows
