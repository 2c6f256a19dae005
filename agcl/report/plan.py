"""`agcl plan`: what a config's grid costs before it runs, and what it can conclude.

Four answers, each from the most direct source there is:
- jobs per rule: Snakemake's own dry run of this config (the whole grid, and what is still to run);
- GPU hours per dataset x method: each run's stages (iterations) over the steps per second that
  benchmarks/gpu_throughput.py measured for the same recipe shape (dataset, method, stage, batch,
  labeled batch, patch, net options, AMP) on a named card; "not measured" where no such row exists;
- disk: the data folders as they are on disk, the exact size of every checkpoint (parameters and
  buffers of the networks, counted without allocating them) and an upper bound for the saved
  test predictions (one byte per test voxel, before compression);
- statistics: per comparison family of the report (dataset x ratio x reference x metric), how
  many tests Holm corrects for, the smallest p_holm its seeds allow, the smallest effect it
  detects with 80 % power and the seeds it needs for the config's smallest effect worth
  detecting (agcl.report.power), at the per-seed sd measured in the grid's stats.csv where
  one exists, else the config's stated prior (stats.prior_seed_sd).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from agcl.common.utils import human_bytes
from agcl.config import Layout, dataset_config, expected_runs
from agcl.report.power import statistics_plan

# Where benchmarks/gpu_throughput.py writes by default and `agcl plan` reads: beside the grid's
# results (<results_dir>/<name>/benchmarks/), not beside the scripts; both take another path.
THROUGHPUT_NAME = "throughput.csv"
# The recipe shape a throughput row was measured at; a run uses a row only if all of these match.
SHAPE_KEYS = ["dataset", "method", "stage", "batch_size", "labeled_batch_size", "patch", "net",
              "amp"]
# amp is the config's value (auto, off, bf16, fp16); amp_dtype what it resolved to on that card.
THROUGHPUT_COLUMNS = SHAPE_KEYS + [
    "card", "amp_dtype", "steps_per_s", "wait_share", "val_seconds", "peak_mem_gib", "torch",
    "code_version", "date",
]


def patch_text(patch) -> str:
    return "x".join(str(int(side)) for side in patch)


def throughput_csv(config: dict, root: str | Path = ".") -> Path:
    """The default throughput table of a config's grid: <results_dir>/<name>/benchmarks/."""
    return Layout(config, root).results / "benchmarks" / THROUGHPUT_NAME


def default_snakefile(root: str | Path = ".") -> Path:
    """The workflow a dry run plans: the Snakefile of the working directory, as snakemake takes
    it; else the one of the source checkout this package runs from (an installed package has
    none: pass `agcl plan --snakefile`)."""
    here = Path(root) / "Snakefile"
    checkout = Path(__file__).resolve().parents[2] / "Snakefile"  # agcl/report/plan.py
    return here if here.exists() or not checkout.exists() else checkout


def net_text(net: dict) -> str:
    """A dataset's net options as one cell, e.g. 'n_filters=16' (widths change the step time)."""
    return ",".join(f"{key}={net[key]}" for key in sorted(net))


def read_throughput(path: str | Path) -> pd.DataFrame:
    """The measured throughput table, or an empty one when nothing was measured yet."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=THROUGHPUT_COLUMNS)
    table = pd.read_csv(path, dtype={"patch": str})
    missing = [c for c in SHAPE_KEYS + ["card", "steps_per_s"] if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {THROUGHPUT_COLUMNS}")
    bad = table[~(pd.to_numeric(table["steps_per_s"], errors="coerce") > 0)]
    if len(bad):
        raise ValueError(f"{path}: steps_per_s must be a positive number (row {bad.index[0] + 2})")
    return table


# --- jobs ------------------------------------------------------------------------------------
def _job_stats(text: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake dry run as {rule: count} (without 'total')."""
    counts, inside = {}, False
    for line in text.splitlines():
        if line.startswith("Job stats:"):
            inside = True
            continue
        words = line.split()
        if inside and len(words) == 2 and words[1].isdigit():
            if words[0] != "total":
                counts[words[0]] = int(words[1])
        elif inside and counts and not words:
            break
    return counts


def job_counts(configfile: str | Path | list, root: str | Path = ".",
               snakefile: str | Path | None = None) -> tuple[dict, dict] | str:
    """({rule: jobs of the whole grid}, {rule: jobs still to run}) from Snakemake dry runs of
    `snakefile` (default: default_snakefile), or the dry run's error text when it cannot plan
    (e.g. a missing CRAG zip)."""
    snakefile = Path(snakefile) if snakefile else default_snakefile(root)
    if not snakefile.exists():
        return (f"{snakefile} does not exist: run agcl plan in the workflow's folder or pass "
                "--snakefile")
    base = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--workflow-profile",
            "none", "--snakefile", str(snakefile.resolve()), "--directory", str(root),
            "--configfile",
            *[str(Path(f).resolve()) for f in (configfile if isinstance(configfile, list)
                                               else [configfile])]]
    # The rules run `python -m agcl` from this interpreter's environment, as `make demo` does.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    results = []
    for extra in (["--forceall"], []):
        out = subprocess.run(base + extra, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
            return "\n".join(lines[-8:])
        results.append(_job_stats(out.stdout))
    whole, remaining = results
    return whole, {rule: remaining.get(rule, 0) for rule in whole}


# --- GPU hours -------------------------------------------------------------------------------
def _runs_per_cell(config: dict) -> dict[tuple[str, str], int]:
    cells: dict[tuple[str, str], int] = {}
    for dataset, method, _, _ in expected_runs(config):
        cells[dataset, method] = cells.get((dataset, method), 0) + 1
    return cells


def recipe_shape(config: dict, dataset: str, method: str, recipe, stage_name: str) -> dict:
    """The SHAPE_KEYS values of one stage of a run: what a throughput row must match."""
    train = recipe.train_cfg
    return {"dataset": dataset, "method": method, "stage": stage_name,
            "batch_size": train["batch_size"], "labeled_batch_size": train["labeled_batch_size"],
            "patch": patch_text(train["patch"]),
            "net": net_text(dataset_config(config, dataset)["net"]), "amp": train["amp"]}


def schedule_seconds(recipe, measured: dict) -> float:
    """A run's whole schedule at measured rates: every stage's iterations over its steps per
    second, plus, for a run that selects on val, one validation pass per val_every steps.
    `measured` maps stage name -> throughput row (a dict or a pandas row)."""
    validates = recipe.selection == "best_val"
    seconds = 0.0
    for stage in recipe.stages:
        row = measured[stage.name]
        seconds += stage.iterations / float(row["steps_per_s"])
        val_seconds = pd.to_numeric(row.get("val_seconds"), errors="coerce")
        if validates and val_seconds > 0:
            seconds += stage.iterations // recipe.train_cfg["val_every"] * float(val_seconds)
    return seconds


def gpu_hours(config: dict, throughput: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x method: runs, iterations per run, and per measured card the hours
    of one run and of all its runs (NaN: that card has no row for one of the run's stages)."""
    from agcl.config.recipe import resolve_recipe

    cards = sorted(throughput["card"].unique()) if len(throughput) else []
    rows = []
    for (dataset, method), n_runs in _runs_per_cell(config).items():
        recipe = resolve_recipe(config, dataset, method)
        row = {"dataset": dataset, "method": method, "runs": n_runs,
               "iterations_per_run": sum(stage.iterations for stage in recipe.stages)}
        for card in cards:
            measured = {}
            for stage in recipe.stages:
                shape = recipe_shape(config, dataset, method, recipe, stage.name)
                match = throughput[(throughput["card"] == card)
                                   & (throughput[SHAPE_KEYS].astype(str)
                                      == pd.Series(shape).astype(str)).all(axis=1)]
                if not match.empty:
                    measured[stage.name] = match.iloc[-1]  # the newest measurement of that shape
            seconds = (schedule_seconds(recipe, measured)
                       if len(measured) == len(recipe.stages) else math.nan)
            row[f"{card} h/run"] = seconds / 3600
            row[f"{card} h total"] = n_runs * seconds / 3600
        rows.append(row)
    return pd.DataFrame(rows)


# --- disk ------------------------------------------------------------------------------------
def _folder_bytes(path: Path) -> int | None:
    if not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel"))


def checkpoint_bytes(config: dict, dataset: str, method: str) -> dict[str, int]:
    """Exact sizes (tensor bytes; the zip container adds a few KB) of a run's final checkpoint
    (the inference network) and of its resume checkpoint (the whole method, with teachers and
    queues, plus SGD momentum for every trainable parameter). Built on the meta device."""
    import torch

    from agcl.config.recipe import resolve_recipe
    from agcl.data.specs import get_spec

    recipe = resolve_recipe(config, dataset, method)
    with torch.device("meta"):
        model = recipe.method_cls(get_spec(dataset), recipe.hparams,
                                  dataset_config(config, dataset)["net"],
                                  recipe.stages[-1].iterations)
    momentum = sum(p.numel() * p.element_size() for p in model.trainable_parameters())
    final = _state_bytes(model.inference_net().state_dict())
    return {"final": final, "resume": _state_bytes(model.state_dict()) + momentum}


def prediction_bytes(config: dict, dataset: str, root: str | Path = ".") -> int | None:
    """Upper bound of one run's saved test predictions (uint8 per voxel, before compression),
    from the processed index; None before the dataset is preprocessed."""
    from agcl.data.preprocess import load_index

    processed = Layout(config, root).processed(dataset)
    if not (processed / "index.json").exists():
        return None
    index = load_index(processed)
    shapes = [index["items"][case].get("shape") for case in index["lists"]["test"]]
    if None in shapes:  # an index written before test shapes were recorded
        return None
    return sum(math.prod(shape) for shape in shapes)


def disk(config: dict, root: str | Path = ".") -> pd.DataFrame:
    """Bytes per dataset: data folders as found (None: not there yet), the final checkpoints of
    all its runs, the largest resume checkpoint one running job keeps (removed when the run
    finishes; with best-on-val selection a best checkpoint of about the same size sits beside
    it while training), and the predictions of all its runs (None: not preprocessed yet)."""
    layout = Layout(config, root)
    rows = []
    for dataset in config["datasets"]:
        final_total, largest_resume, n_runs = 0, 0, 0
        for (d, method), n in _runs_per_cell(config).items():
            if d == dataset:
                size = checkpoint_bytes(config, dataset, method)
                final_total += n * size["final"]
                largest_resume = max(largest_resume, size["resume"])
                n_runs += n
        per_run_predictions = prediction_bytes(config, dataset, root)
        rows.append({
            "dataset": dataset,
            "raw": _folder_bytes(layout.raw(dataset)),
            "processed": _folder_bytes(layout.processed(dataset)),
            "final checkpoints": final_total,
            "largest resume checkpoint": largest_resume,
            "predictions (upper bound)": (None if per_run_predictions is None
                                          else per_run_predictions * n_runs),
        })
    return pd.DataFrame(rows)


def _bytes_cell(count) -> str:
    if count is None or pd.isna(count):
        return "-"
    return human_bytes(count)


def render(config: dict, configfile: str | Path, root: str | Path = ".",
           throughput_path: str | Path | None = None,
           snakefile: str | Path | None = None) -> str:
    """The plan as text, as `agcl plan` prints it (throughput table: throughput_csv by default)."""
    throughput_path = throughput_path or throughput_csv(config, root)
    shown_files = " + ".join(map(str, configfile)) if isinstance(configfile, list) else configfile
    lines = [(f"Plan of {shown_files} (name: {config['name']}; "
              f"{len(expected_runs(config))} training runs)"),
             "", "Jobs per rule (Snakemake dry run):"]
    counts = job_counts(configfile, root, snakefile)
    if isinstance(counts, str):
        lines += ["  the dry run failed, so no job counts:", *("    " + x for x in counts.splitlines())]
    else:
        whole, remaining = counts
        table = pd.DataFrame({"rule": list(whole), "jobs": list(whole.values()),
                              "still to run": [remaining[r] for r in whole]})
        lines += ["  " + x for x in table.to_string(index=False).splitlines()]

    throughput = read_throughput(throughput_path)
    hours = gpu_hours(config, throughput)
    lines += ["", ("Projected GPU time (training steps and validation, measured by "
                   "benchmarks/gpu_throughput.py; evaluation not included):")]
    if throughput.empty:
        lines.append(f"  not measured: {throughput_path} does not exist (run "
                     "benchmarks/gpu_throughput.py on the GPU that will train)")
    else:
        lines.append("  '-': no measurement of that recipe shape (dataset, method, stage, batch, "
                     "labeled batch, patch, net, amp) on that card")
    shown = hours.copy()
    for column in [c for c in shown.columns if c.endswith((" h/run", " h total"))]:
        shown[column] = shown[column].map(lambda h: "-" if math.isnan(h) else f"{h:.2f}")
    lines += ["  " + x for x in shown.to_string(index=False).splitlines()]
    for column in [c for c in hours.columns if c.endswith(" h total")]:
        total = hours[column].sum(min_count=len(hours))
        lines.append(f"  {column[:-len(' h total')]}: "
                     + ("incomplete (some recipe shapes not measured)" if math.isnan(total)
                        else f"{total:.1f} GPU-hours for the whole grid"))

    space = disk(config, root)
    lines += ["", ("Disk ('-': not there yet; checkpoint sizes are exact, predictions an upper "
                   "bound before compression):")]
    sizes = [c for c in space.columns if c != "dataset"]
    space[sizes] = space[sizes].map(_bytes_cell)
    lines += ["  " + x for x in space.to_string(index=False).splitlines()]

    families = statistics_plan(config, root)
    lines += ["", ("What the grid can conclude (per comparison family of the report; 80 % power, "
                   "Holm within the family; agcl.report.intervals):")]
    if families.empty:
        lines.append("  no comparison: the grid has no reference method beside another method")
    else:
        lines += ["  " + x for x in families.to_string(index=False).splitlines()]
        lines += [
            ("  min p_holm: the smallest p_holm any row of the family can reach at these seeds "
             "(sign-flip from 6 seeds: 2 m / 2^S; the t test at 3-5 seeds has no floor but "
             "assumes normal per-seed means)."),
            ("  detectable: the smallest difference found with 80 % power at this per-seed sd "
             "('none': no row can be significant). seeds for it: the seeds needed to detect "
             "config stats.smallest_effect."),
            ("  prior: config stats.prior_seed_sd, an assumption until the grid has a stats.csv "
             "(docs/statistics.md). A 3-seed grid describes (means and spread, as the papers "
             "report); a comparison that must conclude needs an overlay with the seeds above "
             "(e.g. config/decisive.yaml).")]
    return "\n".join(lines)
