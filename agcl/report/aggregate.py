"""Every run's metrics.json -> tidy tables (pandas): per case, per run, mean +- std over seeds.

A run counts only when its finished model, run.json and metrics.json belong together and every
value it contributes is finite; any other run is listed in missing.csv with the reason, and the
summary says how many of the expected seeds each mean is over.

Run-to-run twins (config noise_floor, agcl.config.noise_twins) are not methods: per_case and runs
keep their rows, flagged in `noise_twin_of` (the method they twin; empty for an ordinary run),
while summary, case_means and stats leave them out; run_to_run.csv holds their differences.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import pandas as pd

from agcl.common.utils import atomic_path
from agcl.config import (
    ConfigError,
    Layout,
    comparison_references,
    expected_runs,
    noise_twins,
)
from agcl.config.recipe import resolve_recipe
from agcl.eval.evaluate import METRICS as METRIC_NAMES
from agcl.eval.evaluate import aggregated_value
from agcl.report.noise import run_to_run
from agcl.report.published import compare_with_published
from agcl.report.stats import case_means, paired_comparisons
from agcl.runtime.runfolder import IDENTITY_KEYS, METRICS_JSON, RunFolder

log = logging.getLogger("agcl.aggregate")
KEYS = ["dataset", "method", "ratio", "seed"]
METRICS = list(METRIC_NAMES)


def non_finite_values(summary: dict) -> list[str]:
    """Fields of a metrics.json whose value, as aggregates use it, is not a finite number."""
    bad = []
    for i, rec in enumerate(summary["metric_per_case"]):
        for m in METRICS:
            value = aggregated_value(rec, m)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                bad.append(f"metric_per_case[{i}].{m} = {value} (case {rec.get('case')}, "
                           f"class {rec.get('class')})")
    for m in METRICS:
        value = summary.get("foreground_mean", {}).get(m)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append(f"foreground_mean.{m} = {value}")
    return bad


def not_this_run(config: dict, key: dict, meta: dict, recipe_hashes: dict) -> str | None:
    """Why a folder's evaluated run cannot stand for the grid's run `key` under `config`: it
    holds another dataset / method / ratio / seed (a run trained with --out into this folder) or
    was trained under other settings than the config now gives; None when it is this run. (An
    edited eval block reruns evaluation through its params hash; the report lists the policies
    the runs were evaluated with.)"""
    recorded = {name: meta.get(name) for name in IDENTITY_KEYS}
    expected = {**key, "ratio": float(key["ratio"])}
    wrong = [f"{name} {recorded[name]!r} (expected {expected[name]!r})" for name in IDENTITY_KEYS
             if recorded[name] is None or (float(recorded[name]) != expected[name]
                                           if name == "ratio" else recorded[name] != expected[name])]
    if wrong:
        return ("this folder holds another run (" + ", ".join(wrong) + "): train this run "
                "into it with --force, or move that run to its own folder")
    pair = (key["dataset"], key["method"], key["ratio"])
    if pair not in recipe_hashes:
        try:
            recipe_hashes[pair] = resolve_recipe(config, pair[0], pair[1],
                                                 ratio=pair[2]).settings_hash
        except ConfigError as exc:  # the DAG would not have planned it; nothing to compare
            log.warning("%s on %s: no recipe to compare the runs with (%s)", pair[1], pair[0],
                        exc)
            recipe_hashes[pair] = None
    saved = (meta.get("identity") or {}).get("settings_hash")
    if saved is not None and recipe_hashes[pair] is not None and saved != recipe_hashes[pair]:
        return (f"trained under other settings than the config now gives (settings_hash {saved}, "
                f"the config's {recipe_hashes[pair]}): retrain it (snakemake reruns it)")
    return None


def last_error_line(log: Path) -> str | None:
    """The error a failed `agcl` job printed last (its one-line message, or the last line of a
    traceback), or None."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("agcl ") and ": error: " in line:
            return line
    tail = [line for line in lines if line]
    if any(line.startswith("Traceback") for line in lines) and tail:
        return tail[-1]
    return None


def collect(config: dict, root: str | Path = ".") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per-case rows, per-run rows, missing or rejected runs with the reason) for the grid."""
    layout = Layout(config, root)
    twins = noise_twins(config)
    case_rows, run_rows, missing = [], [], []
    recipe_hashes: dict[tuple[str, str, float], str] = {}
    for dataset, method, ratio, seed in expected_runs(config):
        folder = RunFolder(layout.run(dataset, method, ratio, seed))
        key = {"dataset": dataset, "method": method, "ratio": float(ratio), "seed": seed}
        twin_of = twins.get(method, "")
        summary, meta, reason = folder.evaluated()
        if summary is not None:
            mismatch = not_this_run(config, key, meta, recipe_hashes)
            if mismatch:
                summary, reason = None, mismatch
        if summary is not None:
            bad = non_finite_values(summary)
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                summary, reason = None, (f"non-finite values in metrics.json: {'; '.join(bad[:3])}"
                                         f"{more}; evaluate the run again")
        if summary is None:
            # the job that did not deliver: training, or the evaluation of a finished model
            rule = "evaluate" if folder.is_finished() else "train"
            log_path = layout.job_log(rule, dataset, method, ratio, seed)
            failure = last_error_line(log_path)
            if failure:
                reason = f"{rule} failed: {failure} (log: {log_path})"
            missing.append({**key, "expected": str(folder.file(METRICS_JSON)), "reason": reason,
                            "log": str(log_path) if failure else ""})
            continue
        for rec in summary["metric_per_case"]:
            row = {**key, "case": rec["case"], "class": rec["class"], "class_name": rec["class_name"],
                   "noise_twin_of": twin_of}
            for m in METRICS:
                row[m] = aggregated_value(rec, m)
            row.update(policy_applied=rec["policy_applied"] or "",
                       empty_pred=rec["empty_pred"], empty_gt=rec["empty_gt"])
            case_rows.append(row)
        run_rows.append({**key, **summary["foreground_mean"],
                         "train_seconds": meta.get("train_seconds"),
                         "parameters": meta.get("parameters"),
                         # every network the run trained (peers, heads), not only the evaluated
                         "trained_parameters": meta.get("trainable_parameters"),
                         # steps skipped as non-finite (train.nonfinite: skip)
                         "skipped_steps": meta.get("skipped_steps", 0),
                         "device": meta.get("device"),
                         # autocast dtype of training ("bfloat16", "float16", "off"); older
                         # run.json files have none
                         "amp": meta.get("amp"),
                         "selection": summary["selection"]["policy"],
                         "checkpoint_step": summary["selection"]["step"],
                         "units": summary["protocol"]["units"],
                         "empty_policy": summary["protocol"]["empty_policy"],
                         "policy_applied_count": summary["protocol"]["policy_applied_count"],
                         "code_version": summary["code_version"],
                         "noise_twin_of": twin_of})
    return (pd.DataFrame(case_rows, columns=KEYS + ["case", "class", "class_name", *METRICS,
                                                   "policy_applied", "empty_pred", "empty_gt",
                                                   "noise_twin_of"]),
            pd.DataFrame(run_rows, columns=KEYS + METRICS + [
                "train_seconds", "parameters", "trained_parameters", "skipped_steps", "device",
                "amp", "selection", "checkpoint_step",
                "units", "empty_policy", "policy_applied_count", "code_version",
                "noise_twin_of"]),
            pd.DataFrame(missing, columns=KEYS + ["expected", "reason", "log"]))


def summarise(runs: pd.DataFrame, n_expected_seeds: int | None = None) -> pd.DataFrame:
    """Mean and std (ddof 1; nan with one seed) over seeds of the per-run foreground means;
    n_seeds beside n_expected_seeds shows a mean over fewer seeds than the grid asks for."""
    if runs.empty:
        return pd.DataFrame(columns=["dataset", "method", "ratio", "n_seeds", "n_expected_seeds",
                                     *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")]])
    grouped = runs.groupby(["dataset", "method", "ratio"], sort=True)
    out = grouped[METRICS].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out.insert(0, "n_seeds", grouped.size())
    out.insert(1, "n_expected_seeds", n_expected_seeds if n_expected_seeds else grouped.size())
    return out.reset_index()


def methods_only(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of ordinary methods: noise-floor twins (runs.csv / per_case.csv `noise_twin_of`,
    empty here and read back as NaN from the CSV) are not methods and stay out of the tables,
    figures and comparisons."""
    if frame.empty or "noise_twin_of" not in frame:
        return frame
    twin_of = frame["noise_twin_of"]
    return frame[twin_of.isna() | (twin_of.astype(str) == "")]


def aggregate(config: dict, out_dir: str | Path | None = None, root: str | Path = ".") -> dict:
    """Write the tables every later step (and every user) reads, all computed from per-case rows:
    per_case, runs, summary (mean +- std over seeds), missing, case_means (per case, mean over
    classes then seeds), stats (paired tests against the config's method of interest and its
    lower bound, config `roles`; smallest effects from config `stats`),
    run_to_run (twin - method per seed; empty without noise_floor.methods) and published (ours
    beside the published numbers). Twins are left out of all but per_case, runs and
    run_to_run."""
    out_dir = Path(out_dir) if out_dir else Layout(config, root).results / "summary"
    cases, runs, missing = collect(config, root)
    methods_cases, methods_runs = methods_only(cases), methods_only(runs)
    summary = summarise(methods_runs, len(config["seeds"]))
    tables = {"per_case": cases, "runs": runs, "summary": summary, "missing": missing,
              "case_means": case_means(methods_cases) if not methods_cases.empty
              else pd.DataFrame(),
              "stats": paired_comparisons(
                  methods_cases, comparison_references(config),
                  smallest_effect=config.get("stats", {}).get("smallest_effect"))
              if not methods_cases.empty
              else pd.DataFrame(),
              "run_to_run": run_to_run(cases, noise_twins(config)),
              "published": compare_with_published(summary)}
    # All tables or none: each is written to a temporary first and renamed only once every one
    # is written (a full disk leaves the previous set whole, not some tables new).
    with contextlib.ExitStack() as stack:
        for name, frame in tables.items():
            frame.to_csv(stack.enter_context(atomic_path(out_dir / f"{name}.csv")), index=False)
    return {"out_dir": out_dir, "n_runs": len(runs), "n_missing": len(missing)}
