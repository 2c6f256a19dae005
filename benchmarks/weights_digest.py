"""Digest of every registered method's weights after a tiny run on LA- and ACDC-shaped synthetic
data: the check that a restructuring changed no number. Run it on the commit before a change and
on the change, and compare the two outputs (`diff`); any differing line names the method whose
training changed.

    python benchmarks/weights_digest.py > before.txt   # on the old commit
    python benchmarks/weights_digest.py > after.txt && diff before.txt after.txt

Each run trains 4 main-stage steps (pre-training stages 2) under the reproducible CPU switches
(set them in the environment as `make test` does); the digest is the sha256 of the final
checkpoint's state dict, tensors in name order, bytes as stored.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from agcl.cli import main as agcl
from agcl.config import Layout, load_config
from agcl.data.specs import get_spec
from agcl.methods.registry import registered

# Enough to exercise every term on these sizes; short enough to run all methods in minutes.
TINY = {
    "name": "digest",
    "seeds": [0],
    "methods": ["supervised"],
    "ratios": [0.2],
    "device": "cpu",
    "reproducible_cpu": True,
    "datasets": {
        "la": {"source": "synthetic", "net": {"n_filters": 2},
               "synth": {"n_train": 10, "n_test": 2, "size_xy": [30, 36], "size_z": 16},
               "train": {"iterations": 4, "batch_size": 4, "labeled_batch_size": 2,
                         "patch": [32, 32, 16], "schedule": "poly", "checkpoint_every": 2},
               "eval": {"patch": [32, 32, 16], "stride": [8, 8, 8]}},
        "acdc": {"source": "synthetic", "net": {"base_features": 2},
                 "synth": {"n_train_patients": 10, "n_val_patients": 1, "n_test_patients": 2,
                           "slices": [8, 8], "size_hw": [24, 28]},
                 "train": {"iterations": 4, "batch_size": 4, "labeled_batch_size": 2,
                           "patch": [32, 32], "schedule": "poly", "checkpoint_every": 2},
                 "eval": {"patch": [32, 32]}},
    },
}
SHORT_STAGES = {"pretrain_iterations": 2, "rampup": 0, "queue_length": 32,
                "contrast_patch": 4}


def digest(path: Path) -> str:
    state = torch.load(path, weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(methods: list[str], work: Path) -> list[str]:
    os.chdir(work)  # a config's paths resolve against the working directory
    config_path = work / "config" / "digest.yaml"
    config_path.parent.mkdir(parents=True)
    config_path.write_text(yaml.safe_dump(TINY))
    layout = Layout(load_config(config_path), work)
    lines = []
    for dataset in TINY["datasets"]:
        for step in (["synth", dataset, "--out", layout.raw(dataset)],
                     ["preprocess", dataset, "--src", layout.raw(dataset),
                      "--out", layout.processed(dataset)],
                     ["splits", dataset, "--seed", "0"]):
            with contextlib.redirect_stdout(sys.stderr):
                assert agcl([*map(str, step), "--config", str(config_path)]) == 0, step
        for name in methods:
            cls = registered()[name]
            if cls.unsupported(get_spec(dataset)):
                continue
            sets = [f"{k}={v}" for k, v in SHORT_STAGES.items() if k in cls.hyperparameters]
            out = work / "runs" / dataset / name
            args = ["train", dataset, "--config", str(config_path), "--method", name,
                    "--labels", "0.2", "--seed", "0", "--out", str(out), "--no-progress"]
            for s in sets:
                args += ["--set", s]
            with contextlib.redirect_stdout(sys.stderr):  # stdout holds the digests only
                status = agcl(args)
            if status != 0:
                lines.append(f"{dataset} {name} FAILED")
                continue
            lines.append(f"{dataset} {name} {digest(out / 'ckpt_final.pt')}")
            print(lines[-1], flush=True)
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", help="default: every registered method")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    args = parse_args()
    methods = args.methods or sorted(registered())
    with tempfile.TemporaryDirectory() as tmp:
        lines = run(methods, Path(tmp))
    sys.exit(1 if any(line.endswith("FAILED") for line in lines) else 0)
