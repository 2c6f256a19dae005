"""Published numbers (Semi-AGCL tables, reference releases) and their comparison with ours.

published.csv holds the numbers as printed: Dice/Jaccard in %, HD95/ASD in voxels (medpy without
spacing, as upstream). Dice is required; a metric the source does not print (UniMatch's README
prints Dice only) is left empty and reads as nan, never as a number. Rows the paper contradicts
elsewhere carry a `flag`; both versions are kept where the paper prints two. Label counts of the releases map to ratios as LA 4/8/16 scans ->
0.05/0.1/0.2 and ACDC 3/7 patients -> 0.05/0.1 (the `note` says which).
"""

from __future__ import annotations

import math
import re
from importlib.resources import as_file, files
from pathlib import Path

import pandas as pd

from agcl.data.specs import SPECS
from agcl.eval.metric_table import DISTANCES, TABLE
from agcl.eval.metric_table import METRICS as METRIC_NAMES

COLUMNS = ["dataset", "method", "ratio", *METRIC_NAMES, "source", "note", "flag"]
DATASETS = tuple(SPECS)
METRICS = METRIC_NAMES  # agcl.eval.metric_table
# published in %, ours as fractions
PERCENT_METRICS = tuple(n for n, m in TABLE.items() if m.scale == 100.0)
DISTANCE_METRICS = DISTANCES
KEYS = ["dataset", "method", "ratio"]
PACKAGED_NAME = "agcl/report/published.csv"
_METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Values are printed with two decimals: allow half a unit of the last digit either way.
PRINT_TOLERANCE = 0.005


def _number(row: pd.Series, field: str, low: float, high: float, what: str, where: str,
            optional: bool = False) -> float:
    text = row[field]
    if optional and not text.strip():
        return math.nan  # not published by this source
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{where}: field {field!r}: expected {what}, got {text!r}")
    return value


def validate_published(raw: pd.DataFrame, name: str = PACKAGED_NAME) -> pd.DataFrame:
    """Checked copy of the table read as strings, numbers converted; errors name file and line."""
    missing = [c for c in COLUMNS if c not in raw.columns]
    unknown = [c for c in raw.columns if c not in COLUMNS]
    if missing or unknown:
        raise ValueError(f"{name}: expected columns {COLUMNS}; missing {missing}, unknown {unknown}")
    records = []
    for index, row in raw.iterrows():
        where = f"{name} line {index + 2} ({row['dataset']}/{row['method']}/{row['ratio']})"
        if row["dataset"] not in DATASETS:
            raise ValueError(f"{where}: field 'dataset': expected one of {list(DATASETS)}, "
                             f"got {row['dataset']!r}")
        if not _METHOD_NAME.fullmatch(row["method"]):
            raise ValueError(f"{where}: field 'method': expected a lowercase name "
                             f"([a-z][a-z0-9_]*), got {row['method']!r}")
        if not row["source"].strip():
            raise ValueError(f"{where}: field 'source': expected where the numbers come from")
        record = {"dataset": row["dataset"], "method": row["method"],
                  "ratio": _number(row, "ratio", 1e-9, 1.0, "a label ratio in (0, 1]", where)}
        for field in PERCENT_METRICS:
            record[field] = _number(row, field, 0.0, 100.0, "a value in % within [0, 100]"
                                    + ("" if field == "dice" else " (or empty: not published)"),
                                    where, optional=field != "dice")
        for field in DISTANCE_METRICS:
            record[field] = _number(row, field, 0.0, math.inf,
                                    "a finite distance >= 0 (or empty: not published)", where,
                                    optional=True)
        record.update(source=row["source"], note=row["note"], flag=row["flag"])
        records.append(record)
    table = pd.DataFrame(records, columns=COLUMNS)
    duplicated = table.duplicated([*KEYS, "source"], keep=False)
    if duplicated.any():
        lines = [i + 2 for i in table.index[duplicated]]
        raise ValueError(f"{name} lines {lines}: the same dataset/method/ratio twice from one "
                         "source; give the second version its own source")
    return table


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """The published table (the packaged published.csv unless `path` is given), validated."""
    if path is None:
        with as_file(files("agcl.report") / "published.csv") as packaged:
            raw = pd.read_csv(packaged, dtype=str, keep_default_na=False)
        return validate_published(raw, PACKAGED_NAME)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    return validate_published(raw, str(path))


def dice_jaccard_consistency(published: pd.DataFrame) -> pd.DataFrame:
    """Which rows could come from per-case averages of one set of predictions.

    Per case (and class) J = D / (2 - D), which is convex, so over any set of cases
    mean J >= mean D / (2 - mean D) (Jensen) and mean J <= mean D, whatever the empty-mask
    policy (it gives J = D). A failing row was not averaged that way, or was mistyped. Adds
    `jaccard_min` (%, from the printed Dice) and `dice_jaccard_consistent`, allowing for the
    rounding to two decimals.
    """
    out = published.copy()
    dice = (out["dice"] - PRINT_TOLERANCE) / 100
    out["jaccard_min"] = 100 * dice / (2 - dice)
    jaccard_high = out["jaccard"] + PRINT_TOLERANCE
    out["dice_jaccard_consistent"] = (out["jaccard"].isna()  # no Jaccard printed: nothing to test
                                      | ((jaccard_high >= out["jaccard_min"])
                                         & (out["jaccard"] - PRINT_TOLERANCE
                                            <= out["dice"] + PRINT_TOLERANCE)))
    return out


def _ours(summary: pd.DataFrame) -> pd.DataFrame:
    needed = [*KEYS, *[f"{m}_mean" for m in METRICS]]
    missing = [c for c in needed if c not in summary.columns]
    if missing:
        raise ValueError(f"summary: missing column(s) {missing}; expected summary.csv columns "
                         f"(dataset, method, ratio, n_seeds, <metric>_mean, <metric>_std)")
    out = summary[KEYS].copy()
    out["ratio"] = out["ratio"].astype(float)
    out["n_seeds"] = summary.get("n_seeds", pd.NA)
    out["n_expected_seeds"] = summary.get("n_expected_seeds", out["n_seeds"])
    for metric in METRICS:
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        mean = summary[f"{metric}_mean"].astype(float)
        if metric in PERCENT_METRICS and (mean > 1).any():
            row = summary.loc[mean > 1].iloc[0]
            raise ValueError(f"summary: {metric}_mean = {row[f'{metric}_mean']} for "
                             f"{row['dataset']}/{row['method']}/{row['ratio']}: expected a "
                             "fraction in [0, 1] (summary.csv), not %")
        out[f"{metric}_ours"] = mean * scale
        std = f"{metric}_std"
        out[f"{metric}_ours_std"] = summary[std].astype(float) * scale if std in summary else math.nan
    return out


def compare_with_published(summary: pd.DataFrame,
                           published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our summary next to every published row of the same dataset x method x ratio.

    Ours are converted to % for Dice/Jaccard; `<metric>_diff` = ours - published. Outer join:
    `present` says "both", "ours_only" or "published_only", the missing side is nan. A key with
    several published sources gives one row per source.
    """
    published = load_published() if published is None else published
    ours = _ours(summary)
    theirs = published.rename(columns={m: f"{m}_published" for m in METRICS})
    # Ratios come from YAML and CSV text: round so 0.1 meets 0.1 whatever the parsing path.
    ours["ratio"] = ours["ratio"].round(6)
    theirs = theirs.assign(ratio=theirs["ratio"].astype(float).round(6))
    merged = ours.merge(theirs, on=KEYS, how="outer", indicator="present")
    merged["present"] = merged["present"].map(
        {"both": "both", "left_only": "ours_only", "right_only": "published_only"}).astype(str)
    for count in ("n_seeds", "n_expected_seeds"):  # stay integers next to nan rows
        merged[count] = merged[count].astype("Int64")
    for metric in METRICS:
        merged[f"{metric}_diff"] = merged[f"{metric}_ours"] - merged[f"{metric}_published"]
    per_metric = [f"{m}_{part}" for m in METRICS
                  for part in ("ours", "ours_std", "published", "diff")]
    columns = [*KEYS, "n_seeds", "n_expected_seeds", "present", "source", "flag", "note", *per_metric]
    return (merged[columns].sort_values([*KEYS, "source"], kind="stable", na_position="first")
            .reset_index(drop=True))


def load_published_compute() -> pd.DataFrame:
    """The paper's compute table (parameters in millions, training minutes), packaged."""
    with as_file(files("agcl.report") / "published_compute.csv") as packaged:
        table = pd.read_csv(packaged)
    expected = ["dataset", "method", "ratio", "parameters_m", "train_minutes", "source"]
    if list(table.columns) != expected:
        raise ValueError(f"published_compute.csv: expected columns {expected}, "
                         f"got {list(table.columns)}")
    return table
