"""Steps per second of every method through the real training engine, at a config's recipes.

For each dataset x method the Trainer itself runs --warmup + --steps iterations of every stage of
the method (a pre-training stage is shortened to the same length) on synthetic data of the real
sizes, with the config's batch, patch, net, AMP and channels-last settings. Per stage:
  steps_per_s   1 / median step time after the warmup (data, forward, backward, optimiser, EMA)
  wait_share    median share of a step spent drawing, augmenting and handing over the batch
  val_seconds   one validation pass plus its checkpoint, with as many val cases as upstream
                (best_val datasets only)
  peak_mem_gib  peak CUDA memory of the method
It prints the projected time of each method's full schedule and writes the rows that
`agcl plan` reads (<results_dir>/<name>/benchmarks/throughput.csv of --config, or --out; rows of
the same card and recipe are replaced).

    python benchmarks/gpu_throughput.py --device cuda                 # LA and ACDC, every method
    python benchmarks/gpu_throughput.py --device cuda --datasets la --methods semi_agcl bcp
    python benchmarks/gpu_throughput.py --device cpu --quick          # a smoke run on tiny sizes

Goal (issue 9): LA 5 % Semi-AGCL, full schedule, <= 20 minutes on one H100-class GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agcl.cli import main as agcl
from agcl.common.utils import code_version, write_text
from agcl.config import Layout, load_config, validate_config
from agcl.config.recipe import resolve_recipe
from agcl.engine.trainer import Trainer
from agcl.methods.registry import list_methods
from agcl.report.plan import (
    SHAPE_KEYS,
    THROUGHPUT_COLUMNS,
    read_throughput,
    recipe_shape,
    schedule_seconds,
    throughput_csv,
)

# Synthetic stand-ins at the upstream sizes (LA volumes ~ 120-150 x 120-150 x 80-90 voxels; ACDC
# 10 val patients = the 20 frames of val.list, slices ~ 220-256 px).
FULL_SYNTH = {
    "la": {"n_train": 8, "n_test": 1, "size_xy": [120, 144], "size_z": 88},
    "acdc": {"n_train_patients": 8, "n_val_patients": 10, "n_test_patients": 1,
             "slices": [8, 10], "size_hw": [216, 256]},
}
QUICK = {  # --quick: tiny sizes, for a CPU smoke run of the script itself
    "la": {"synth": {"n_train": 4, "n_test": 1, "size_xy": [34, 36], "size_z": 18},
           "net": {"n_filters": 2}, "patch": [32, 32, 16]},
    "acdc": {"synth": {"n_train_patients": 4, "n_val_patients": 1, "n_test_patients": 1,
                       "slices": [4, 4], "size_hw": [36, 36]},
             "net": {"base_features": 2}, "patch": [32, 32]},
}
RATIO = 0.5  # enough labeled images for every labeled batch; speed does not depend on it
PRETRAIN_KEY = "pretrain_iterations"


def benchmark_config(config: dict, datasets: list[str], quick: bool, device: str,
                     workdir: Path) -> dict:
    """The config the benchmark trains with: the given recipes, on synthetic data in workdir."""
    config = copy.deepcopy(config)
    config.update(name="throughput", data_dir=str(workdir / "data"),
                  results_dir=str(workdir / "results"), reports_dir=str(workdir / "reports"),
                  device=device, ratios=[RATIO], seeds=[0], full_supervision=False,
                  run_datasets=datasets)
    for dataset in datasets:
        dcfg = config["datasets"][dataset]
        dcfg["source"] = "synthetic"
        dcfg["synth"] = QUICK[dataset]["synth"] if quick else FULL_SYNTH[dataset]
        if quick:
            dcfg["net"] = QUICK[dataset]["net"]
            dcfg["train"]["patch"] = QUICK[dataset]["patch"]
            dcfg["eval"] = {"patch": QUICK[dataset]["patch"]}
            dcfg["train"]["batch_size"], dcfg["train"]["labeled_batch_size"] = 4, 2
            dcfg.pop("train_by_method", None)
    return validate_config(config, source="gpu_throughput")


def prepare_data(configfile: Path, config: dict, dataset: str) -> None:
    layout = Layout(config)
    for args in (["synth", dataset, "--out", layout.raw(dataset), "--config", configfile],
                 ["preprocess", dataset, "--src", layout.raw(dataset), "--out",
                  layout.processed(dataset), "--config", configfile],
                 ["splits", dataset, "--config", configfile, "--seed", "0"]):
        if agcl([str(a) for a in args]) != 0:
            raise RuntimeError(f"agcl {' '.join(map(str, args))} failed")


def measure(config: dict, dataset: str, method: str, recipe, warmup: int, steps: int,
            workdir: Path) -> list[dict]:
    """One row per stage of `method` on `dataset` (`recipe`: its resolved recipe)."""
    length = warmup + steps
    # one log row per step: the timings are per step
    overrides = {"train.val_every": 10**9, "train.checkpoint_every": 10**9, "train.log_every": 1}
    if PRETRAIN_KEY in recipe.hparams:
        overrides[PRETRAIN_KEY] = length
    trainer = Trainer(config, dataset, method, RATIO, 0, workdir / "runs" / dataset / method,
                      iterations=length, overrides=overrides, force=True, progress=False)
    if trainer.description.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.description.device)
    meta = trainer.run()
    peak = (torch.cuda.max_memory_allocated(trainer.description.device) / 2**30
            if trainer.description.device.type == "cuda" else float("nan"))
    log = pd.read_csv(trainer.out / "train_log.csv")
    card = (torch.cuda.get_device_name(trainer.description.device) if trainer.description.device.type == "cuda"
            else f"cpu {platform.machine()} x{torch.get_num_threads()}")
    rows = []
    for record in meta["stages"]:
        stage_rows = log[log["stage"] == record["name"]]
        timed = stage_rows[stage_rows["stage_step"] > warmup]
        validates = trainer.description.recipe.selection == "best_val" and meta["n_val"] > 0
        rows.append({
            **recipe_shape(config, dataset, method, recipe, record["name"]), "card": card,
            "amp_dtype": meta["amp"],
            "steps_per_s": 1.0 / statistics.median(timed["seconds"]),
            "wait_share": statistics.median(timed["data_seconds"] / timed["seconds"]),
            # the stage's wall time beyond its steps: its one validation (and best checkpoint)
            "val_seconds": (max(0.0, record["seconds"] - stage_rows["seconds"].sum())
                            if validates else ""),
            "peak_mem_gib": peak, "torch": torch.__version__, "code_version": code_version(),
            "date": datetime.date.today().isoformat(),
        })
    return rows


def save_rows(path: Path, rows: list[dict]) -> None:
    """Replace the rows of the same card and recipe shape, keep the others; atomic write."""
    new = pd.DataFrame(rows, columns=THROUGHPUT_COLUMNS)
    old = read_throughput(path)
    keys = ["card", *SHAPE_KEYS]
    if len(old):
        mark = new[keys].astype(str).agg("|".join, axis=1)
        old = old[~old[keys].astype(str).agg("|".join, axis=1).isin(mark)]
    table = pd.concat([old, new], ignore_index=True) if len(old) else new
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    write_text(path, buffer.getvalue())


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"),
                        help="whose recipes to time (default: the paper grid)")
    parser.add_argument("--datasets", nargs="+", default=["la", "acdc"], choices=["la", "acdc"])
    parser.add_argument("--methods", nargs="+", help="default: every registered method")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per stage")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per stage")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, nets, patches and batches (a smoke run, not a measurement)")
    parser.add_argument("--out", help="CSV that agcl plan reads (default: "
                        "<results_dir>/<name>/benchmarks/throughput.csv of --config)")
    parser.add_argument("--workdir", help="keep the synthetic data and runs here (default: temp)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = args.methods or list_methods()
    base = load_config(args.config)
    out = Path(args.out) if args.out else throughput_csv(base)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        config = benchmark_config(base, args.datasets, args.quick, args.device, workdir)
        configfile = workdir / "throughput.yaml"
        configfile.parent.mkdir(parents=True, exist_ok=True)
        configfile.write_text(yaml.safe_dump(config))
        rows = []
        print("dataset,method,stage,steps_per_s,wait_share,val_seconds,peak_mem_gib,"
              "projected_minutes_full_schedule")
        for dataset in args.datasets:
            prepare_data(configfile, config, dataset)
            for method in methods:
                if method not in config["methods"]:
                    print(f"# {method} is not in {args.config}'s methods: skipped")
                    continue
                if method in config["datasets"][dataset].get("skip_methods", []):
                    print(f"# {method} is in datasets.{dataset}.skip_methods: skipped")
                    continue
                recipe = resolve_recipe(config, dataset, method)
                measured = measure(config, dataset, method, recipe, args.warmup, args.steps,
                                   workdir)
                # the config's own schedule (its iterations), at the measured rates
                minutes = schedule_seconds(recipe, {row["stage"]: row for row in measured}) / 60
                for row in measured:
                    print(f"{dataset},{method},{row['stage']},{row['steps_per_s']:.3f},"
                          f"{row['wait_share']:.3f},{row['val_seconds'] or ''},"
                          f"{row['peak_mem_gib']:.2f},{minutes:.1f}")
                rows += measured
    save_rows(out, rows)
    print(f"# card {rows[0]['card'] if rows else '-'}; {len(rows)} rows -> {out}; "
          f"settings {json.dumps({'warmup': args.warmup, 'steps': args.steps, 'quick': args.quick})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
