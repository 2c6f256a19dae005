"""The one training loop every method goes through.

It owns the device, AMP, the optimiser and schedule, backward, checkpoints (resume), validation
and the per-iteration CSV log; the method only turns a batch into a loss.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from agcl.config import Layout, dataset_config, ratio_tag, validate_config
from agcl.data.loaders import PatchSampler, load_cases, load_training_set, read_split
from agcl.data.specs import get_spec
from agcl.engine import checkpoint
from agcl.engine.inference import dice_per_class, eval_window, predict_case
from agcl.methods.base import Batch
from agcl.methods.registry import get_method
from agcl.utils import code_version, write_json

log = logging.getLogger("agcl.train")

FINAL = "ckpt_final.pt"
LAST = "ckpt_last.pt"  # rolling resume point, deleted once the run is final
BEST = "ckpt_best.pt"
LOG_CSV = "train_log.csv"
RUN_JSON = "run.json"


class RunExistsError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA where supported, fp16 (with a scaler) on older GPUs, off on CPU."""
    if setting == "off" or (setting == "auto" and device.type == "cpu"):
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        # cuBLAS needs this for deterministic GEMMs; some 3D CUDA kernels have no deterministic
        # version, so on CUDA we warn instead of failing (CPU runs are exactly repeatable).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")


def learning_rate(train_cfg: dict, step: int, total: int) -> float:
    base = train_cfg["lr"]
    if train_cfg["schedule"] == "step":
        return base * train_cfg["gamma"] ** (step // train_cfg["step_size"])
    if train_cfg["schedule"] == "poly":
        return base * (1.0 - step / total) ** 0.9
    return base


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML scalars (numbers, bools, lists)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got '{pair}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _pop_train_overrides(config: dict, dataset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`--set train.lr=0.001` overrides datasets.<name>.train.lr; other keys are method hparams.

    The overridden config is validated like the file itself, so a wrong key or value is named.
    """
    train = {k.split(".", 1)[1]: overrides.pop(k) for k in list(overrides) if k.startswith("train.")}
    if train:
        candidate = copy.deepcopy(config)
        candidate["datasets"][dataset]["train"].update(train)
        validate_config(candidate, source="--set train.*")
    return train


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError("train.tensorboard is true but the tensorboard package is missing "
                           "(pip install tensorboard)") from exc
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _to_device(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    if array is None:
        return None
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class Trainer:
    def __init__(self, config: dict, dataset: str, method: str, ratio: float, seed: int,
                 out: str | Path, *, iterations: int | None = None, device: str | None = None,
                 overrides: dict[str, Any] | None = None, force: bool = False,
                 progress: bool = True, root: str | Path = "."):
        self.config = config
        self.dataset = dataset
        self.spec = get_spec(dataset)
        self.dcfg = dataset_config(config, dataset)
        overrides = dict(overrides or {})
        self.train_cfg = {**self.dcfg["train"], **_pop_train_overrides(config, dataset, overrides)}
        if iterations is not None:
            self.train_cfg["iterations"] = iterations
        self.total = self.train_cfg["iterations"]
        self.ratio = ratio
        self.ratio_tag = ratio_tag(ratio)
        self.seed = seed
        self.out = Path(out)
        self.progress = progress
        self.layout = Layout(config, root)
        self.device = resolve_device(device or config.get("device", "auto"))
        self.amp_dtype = resolve_amp(self.train_cfg["amp"], self.device)

        if (self.out / FINAL).exists():
            if not force:
                raise RunExistsError(f"{self.out / FINAL} exists: this run is finished "
                                     "(pass --force to train it again from scratch)")
            for name in (FINAL, LAST, BEST, LOG_CSV, RUN_JSON):
                (self.out / name).unlink(missing_ok=True)

        self.method_cls = get_method(method)
        self.hparams = self.method_cls.hparams_for(
            dataset,
            config.get("hparams", {}).get(method, {}),
            self.dcfg.get("hparams", {}).get(method, {}),
            overrides,
        )
        self.selection = self.dcfg["selection"]

    # ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        seed_everything(self.seed, self.device)
        split = read_split(self.layout.splits(self.dataset, self.seed))
        processed = self.layout.processed(self.dataset)
        data = load_training_set(processed, split, self.ratio_tag, self.train_cfg["patch"])
        val_cases = load_cases(processed, split["val"]) if split["val"] else []
        if self.selection == "best_val" and not val_cases:
            raise ValueError(f"datasets.{self.dataset}.selection is best_val but the split has no "
                             f"val cases (set datasets.{self.dataset}.val_cases > 0)")

        method = self.method_cls(self.spec, self.hparams, self.dcfg["net"], self.total).to(self.device)
        labeled_bs = self.train_cfg["labeled_batch_size"]
        unlabeled_bs = self.train_cfg["batch_size"] - labeled_bs if method.uses_unlabeled else 0
        sampler = PatchSampler(data, self.train_cfg["patch"], labeled_bs, unlabeled_bs, self.seed)
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=self.train_cfg["lr"],
                                    momentum=self.train_cfg["momentum"],
                                    weight_decay=self.train_cfg["weight_decay"])
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        state = {"step": 0, "best_val": -math.inf, "best_step": None}

        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / LAST).exists():
            ckpt = checkpoint.load(self.out / LAST, map_location=self.device)
            method.load_state_dict(ckpt["method"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            sampler.load_state_dict(ckpt["sampler"])
            checkpoint.set_rng_states(ckpt["rng"])
            state = ckpt["state"]
            log.info("resuming %s at step %d", self.out, state["step"])
        self._truncate_log(state["step"])

        fields = None
        board = _tensorboard_writer(self.out) if self.train_cfg["tensorboard"] else None
        bar = tqdm(total=self.total, initial=state["step"], disable=not self.progress,
                   desc=f"{self.dataset}/{method.name}/r{self.ratio_tag}/s{self.seed}", unit="it")
        method.train()
        started = time.perf_counter()
        with open(self.out / LOG_CSV, "a", newline="") as log_file, bar:
            for step in range(state["step"], self.total):
                row = self._step(method, sampler, optimizer, scaler, step)
                state["step"] = step + 1
                if val_cases and (state["step"] % self.train_cfg["val_every"] == 0
                                  or state["step"] == self.total):
                    row["val_dice"] = self._validate(method, val_cases)
                    if row["val_dice"] > state["best_val"]:
                        state["best_val"], state["best_step"] = row["val_dice"], state["step"]
                        checkpoint.save(self.out / BEST, self._final_payload(method, state))
                    method.train()
                if fields is None:  # columns fixed by the first row; val_dice only with a val set
                    fields = [f for f in row if f != "val_dice"] + (["val_dice"] if val_cases else [])
                    writer = csv.DictWriter(log_file, fieldnames=fields, extrasaction="ignore")
                    if log_file.tell() == 0:
                        writer.writeheader()
                if state["step"] % self.train_cfg["log_every"] == 0 or "val_dice" in row:
                    writer.writerow(row)
                    log_file.flush()
                    if board is not None:
                        for key, value in row.items():
                            if key != "step":
                                board.add_scalar(key, value, state["step"])
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if state["step"] % self.train_cfg["checkpoint_every"] == 0 and state["step"] < self.total:
                    checkpoint.save(self.out / LAST, {
                        "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "sampler": sampler.state_dict(),
                        "rng": checkpoint.rng_states(), "state": state,
                    })
        elapsed = time.perf_counter() - started
        if board is not None:
            board.close()

        checkpoint.save(self.out / FINAL, self._final_payload(method, state))
        meta = self._metadata(state, data, split, elapsed)
        write_json(self.out / RUN_JSON, meta)
        (self.out / LAST).unlink(missing_ok=True)
        return meta

    # ----------------------------------------------------------------------------------------
    def _step(self, method, sampler, optimizer, scaler, step: int) -> dict:
        """One optimiser step; returns the log row."""
        tic = time.perf_counter()
        x_l, y_l, x_u = sampler.next_batch()
        batch = Batch(_to_device(x_l, self.device), _to_device(y_l, self.device),
                      _to_device(x_u, self.device))
        lr = learning_rate(self.train_cfg, step, self.total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, logs = method.train_step(batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}: {logs}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        method.after_optimizer_step(step)
        seconds = time.perf_counter() - tic
        return {"step": step + 1, "lr": lr, "loss": float(loss.detach()), **logs,
                "seconds": seconds, "it_per_s": 1.0 / seconds}

    def _truncate_log(self, step: int) -> None:
        """Drop log rows written after the checkpoint we resume from (they will be redone)."""
        path = self.out / LOG_CSV
        if not path.exists():
            return
        if step == 0:
            path.unlink()
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def _validate(self, method, cases) -> float:
        eval_cfg = self.dcfg["eval"]
        patch, stride = eval_window(eval_cfg, self.train_cfg["patch"])
        scores = []
        for case in cases:
            pred = predict_case(method.inference_net(), case.image, self.spec.eval_mode,
                                self.spec.num_classes, patch, stride, self.device,
                                eval_cfg["window_batch"], self.amp_dtype)
            scores.append(np.mean(dice_per_class(pred, case.label, self.spec.num_classes)))
        return float(np.mean(scores))

    def _final_payload(self, method, state: dict) -> dict:
        """What evaluation needs: the inference network alone, and how to rebuild it."""
        return {
            "net_name": method.net_name(self.spec),
            "net_kwargs": dict(self.dcfg["net"]),
            "in_channels": self.spec.in_channels,
            "num_classes": self.spec.num_classes,
            "state_dict": method.inference_net().state_dict(),
            "step": state["step"],
            "method": method.name,
        }

    def _metadata(self, state: dict, data, split: dict, elapsed: float) -> dict:
        return {
            "dataset": self.dataset,
            "method": self.method_cls.name,
            "ratio": self.ratio,
            "seed": self.seed,
            "iterations": self.total,
            "hparams": self.hparams,
            "train": self.train_cfg,
            "net": {"name": self.method_cls.net_name(self.spec), **self.dcfg["net"]},
            "labeled": data.labeled_ids,
            "n_labeled": len(data.labeled_ids),
            "n_unlabeled": len(data.unlabeled_ids),
            "n_val": len(split["val"]),
            "selection": self.selection,
            "best_val_dice": None if state["best_step"] is None else state["best_val"],
            "best_val_step": state["best_step"],
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "train_seconds": elapsed,
            "code_version": code_version(),
            "config_name": self.config["name"],
            "config": self.config,
        }
