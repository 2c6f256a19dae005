"""The GPU check: one script to run the day a CUDA GPU is lent, on one card, in under 8 minutes.

1. every method of the config, a few hundred steps in all, at the paper's LA and ACDC shapes with
   the config's AMP: steps per second and peak memory per method and stage
   (benchmarks/gpu_throughput.py's measurement, through the real Trainer);
2. a run killed half-way and resumed ends with the same weights as an uninterrupted one (CUDA in
   deterministic mode, CUBLAS_WORKSPACE_CONFIG set before CUDA starts);
3. that run evaluated on the GPU and on the CPU: per-case Dice / HD95 and the predictions compared;
4. LA 5 % Semi-AGCL's full schedule extrapolated from its measured rates (the issue-9 goal: <= 20
   minutes on one H100-class card).
It writes gpu_check.json (everything) and prints a short table. On a CPU (`--device cpu
--quick`) it runs the same steps on tiny sizes: that is how the suite tests it.

    bash benchmarks/gpu_check.sh                      # on the GPU machine: writes $OUT or ./
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before torch

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_throughput import benchmark_config, measure, prepare_data

from agcl.common.utils import code_version, write_json
from agcl.config import load_config
from agcl.config.recipe import resolve_recipe
from agcl.engine.trainer import Trainer
from agcl.eval.evaluate import evaluate_run
from agcl.methods.registry import list_methods
from agcl.report.plan import schedule_seconds
from agcl.runtime.runfolder import FINAL, PREDICTIONS

RESUME_METHOD, RESUME_DATASET = "semi_agcl", "la"  # the most stateful method: queue, EMA, stages
RATIO = 0.5


class _Killed(Exception):
    pass


class KilledTrainer(Trainer):
    """A Trainer that dies before step `kill_at` (1-based), as a kill would."""

    kill_at = 0

    def _step(self, method, update, sampler, stage, step, state):
        if state.step + 1 == self.kill_at:
            raise _Killed
        return super()._step(method, update, sampler, stage, step, state)


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / FINAL, weights_only=True, map_location="cpu")["state_dict"]


def resume_check(config: dict, workdir: Path, steps: int) -> dict:
    """An uninterrupted run and one killed at steps // 2 and resumed: identical final weights?"""
    overrides = {"train.deterministic": True, "train.checkpoint_every": max(1, steps // 4),
                 "train.val_every": 10**9, "pretrain_iterations": steps}
    whole = workdir / "resume" / "whole"
    Trainer(config, RESUME_DATASET, RESUME_METHOD, RATIO, 0, whole, iterations=steps,
            overrides=overrides, force=True, progress=False).run()
    killed = workdir / "resume" / "killed"
    trainer = KilledTrainer(config, RESUME_DATASET, RESUME_METHOD, RATIO, 0, killed,
                            iterations=steps, overrides=overrides, force=True, progress=False)
    trainer.kill_at = steps + steps // 2  # inside the main stage, after the pre-training
    try:
        trainer.run()
    except _Killed:
        pass
    meta = Trainer(config, RESUME_DATASET, RESUME_METHOD, RATIO, 0, killed, iterations=steps,
                   overrides=overrides, progress=False).run()
    a, b = weights_of(whole), weights_of(killed)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    return {"method": RESUME_METHOD, "dataset": RESUME_DATASET, "steps": 2 * steps,
            "killed_before_step": trainer.kill_at, "resumed_at_steps": meta["resumed_at_steps"],
            "identical": not differing, "differing_tensors": differing[:10], "run": str(whole)}


def evaluation_check(config: dict, run: Path, device: str) -> dict:
    """The same run evaluated on `device` and on the CPU: per-case metrics and predictions."""
    results = {}
    for where in (device, "cpu"):
        summary = evaluate_run(config, RESUME_DATASET, run, device=where, save_predictions=True)
        results[where] = (summary, dict(np.load(run / PREDICTIONS)))
    (gpu, gpu_pred), (cpu, cpu_pred) = results[device], results["cpu"]
    dice = [abs(a["dice"] - b["dice"]) for a, b in zip(gpu["metric_per_case"],
                                                         cpu["metric_per_case"])]
    voxels = sum(int((gpu_pred[k] != cpu_pred[k]).sum()) for k in gpu_pred)
    return {"device": device, "cases": len(dice), "max_abs_dice_diff": max(dice, default=0.0),
            "differing_voxels": voxels,
            "total_voxels": sum(int(v.size) for v in gpu_pred.values()),
            "dice_device": gpu["foreground_mean"]["dice"], "dice_cpu": cpu["foreground_mean"]["dice"]}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", help="default: every method of the config")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method and stage")
    parser.add_argument("--resume-steps", type=int, default=40,
                        help="steps per stage of the kill-and-resume check")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."),
                        help="folder of gpu_check.json (default: $OUT, else .)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    base = load_config(args.config)
    methods = [m for m in (args.methods or base["methods"]) if m in list_methods()]
    report = {"card": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                       else f"cpu {platform.machine()}"),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "code_version": code_version(), "config": args.config, "quick": args.quick,
              "throughput": [], "resume": None, "evaluation": None}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = benchmark_config(base, ["la", "acdc"], args.quick, args.device, workdir)
        configfile = workdir / "check.yaml"
        configfile.write_text(yaml.safe_dump(config))
        for dataset in ("la", "acdc"):
            prepare_data(configfile, config, dataset)
            for method in methods:
                if method in config["datasets"][dataset].get("skip_methods", []):
                    continue
                recipe = resolve_recipe(config, dataset, method)
                rows = measure(config, dataset, method, recipe, args.warmup, args.steps,
                               workdir)
                full = resolve_recipe(base, dataset, method)  # the config's own schedule
                minutes = schedule_seconds(full, {r["stage"]: r for r in rows}) / 60
                for row in rows:
                    report["throughput"].append({**row, "full_schedule_minutes": minutes})
        resume_config = copy.deepcopy(config)
        report["resume"] = resume_check(resume_config, workdir, args.resume_steps)
        report["evaluation"] = evaluation_check(resume_config, Path(report["resume"]["run"]),
                                                args.device)
    la_agcl = [r for r in report["throughput"]
               if (r["dataset"], r["method"]) == ("la", "semi_agcl")]
    report["la_semi_agcl_full_schedule_minutes"] = (la_agcl[0]["full_schedule_minutes"]
                                                    if la_agcl else None)
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    write_json(out / "gpu_check.json", report)
    print(f"card {report['card']}, torch {report['torch']}, {report['seconds']:.0f} s")
    print("dataset method stage steps/s peak_GiB full_schedule_min")
    for r in report["throughput"]:
        print(f"{r['dataset']} {r['method']} {r['stage']} {r['steps_per_s']:.2f} "
              f"{r['peak_mem_gib']:.2f} {r['full_schedule_minutes']:.1f}")
    res, ev = report["resume"], report["evaluation"]
    print(f"resume: killed before step {res['killed_before_step']}, identical weights: "
          f"{res['identical']}")
    print(f"evaluation {ev['device']} vs cpu: max |Dice diff| {ev['max_abs_dice_diff']:.2e}, "
          f"{ev['differing_voxels']} of {ev['total_voxels']} voxels differ")
    print(f"LA 5 % semi_agcl full schedule: {report['la_semi_agcl_full_schedule_minutes']} min; "
          f"-> {out / 'gpu_check.json'}")
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
