"""The one training loop every method goes through.

It owns the device, AMP, the optimiser and schedule, backward, the non-finite policy, checkpoints
(resume), validation and the per-iteration CSV log; the method only turns a batch into a loss.
What the run folder holds and when a run counts as finished is agcl.runfolder's business.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from agcl.config import (
    ConfigError,
    Layout,
    dataset_config,
    ratio_tag,
)
from agcl.data.loaders import (
    PatchSampler,
    load_cases,
    load_training_set,
    read_split,
    training_set_bytes,
)
from agcl.data.preprocess import load_index
from agcl.data.specs import get_spec
from agcl.devices import amp_name, resolve_amp, resolve_device
from agcl.engine import checkpoint
from agcl.engine.recipe import resolve_recipe
from agcl.inference import dice_per_class, eval_window, predict_case
from agcl.methods.base import Batch
from agcl.numerics import cpu_numerics
from agcl.random_streams import RandomStreams, building, seed_globals
from agcl.runfolder import (
    BEST,
    FINAL,
    LAST,
    LOG_CSV,
    PRETRAIN_BEST,
    RUN_JSON,
    RunExistsError,
    RunFolder,
    RunMismatchError,
    identity_differences,
    run_identity,
)
from agcl.utils import code_version, write_json

log = logging.getLogger("agcl.train")

# How many skipped steps run.json lists by number (all are counted).
LISTED_SKIPS = 50


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient and the policy says stop."""


def seed_everything(seed: int, device: torch.device, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        # cuBLAS needs this for deterministic GEMMs; some 3D CUDA kernels have no deterministic
        # version, so on CUDA we warn instead of failing (CPU runs are exactly repeatable).
        # Not deterministic: cuDNN benchmarks and picks the fastest convolution algorithms.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")


def resolve_deterministic(setting: str | bool, device: torch.device) -> bool:
    """train.deterministic: auto = on the CPU (where it costs nothing and runs repeat exactly),
    off on CUDA (cuDNN autotuning; GPU runs are not bit-repeatable even with it on)."""
    if setting == "auto":
        return device.type != "cuda"
    return bool(setting)


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


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError("train.tensorboard is true but the tensorboard package is missing "
                           "(pip install tensorboard)") from exc
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def channels_last_format(ndim: int) -> torch.memory_format:
    """The channels-last memory format of an (N, C, spatial...) tensor with `ndim` dimensions."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


def _to_device(batch: torch.Tensor | None, device: torch.device,
               channels_last: bool = False) -> torch.Tensor | None:
    """A sampler's batch on the training device (a no-op when the training set lives there)."""
    if batch is None:
        return None
    if batch.device.type == "cpu" and device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    elif batch.device != device:
        batch = batch.to(device)
    if channels_last:
        batch = batch.contiguous(memory_format=channels_last_format(batch.ndim))
    return batch


# data_placement auto holds the training set on a GPU when it takes at most this share of the
# card's memory (LA: ~0.5 GB, ACDC: ~0.4 GB at the upstream sizes; an H100 has 80 GB).
DEVICE_DATA_SHARE = 0.25


def data_device(placement: str, device: torch.device, nbytes: int) -> torch.device | None:
    """Where the sampler keeps the training set: on the training device (None = host memory)."""
    if device.type != "cuda" or placement == "host":
        return None
    if placement == "device":
        return device
    total = torch.cuda.get_device_properties(device).total_memory
    return device if nbytes <= DEVICE_DATA_SHARE * total else None


# Log-row keys that are not summed over the steps between two written rows: the row shows the
# value of its own step.
LAST_VALUE_KEYS = ("step", "stage", "stage_step", "lr")


class StepLog:
    """The log rows of one run, accumulated where the values live.

    A method's log values and the loss stay tensors on the training device; each step adds them
    to device-side sums, and only a written row (every log_every steps, at validations and at the
    end of a stage) reads them back, in one transfer. Terms are means over the applied steps
    since the last row (skipped steps are counted in `skipped`, their NaN terms left out);
    `seconds` is the mean step time and `it_per_s` its inverse.
    """

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, Any] = {}
        self.skipped = 0
        self.steps = 0

    def add(self, row: dict, skipped: bool) -> None:
        self.steps += 1
        self.skipped += int(skipped)
        for key, value in row.items():
            if key in LAST_VALUE_KEYS:
                self.last[key] = value
            elif skipped and key not in ("seconds", "data_seconds"):
                continue
            else:
                value = value.detach() if torch.is_tensor(value) else float(value)
                self.sums[key] = self.sums[key] + value if key in self.sums else value
                self.counts[key] = self.counts.get(key, 0) + 1

    def read(self) -> dict:
        """The row of the steps since the last read (one host transfer for all tensor terms)."""
        tensors = [k for k, v in self.sums.items() if torch.is_tensor(v)]
        values = dict(self.sums)
        if tensors:
            # a method may log a host scalar beside device ones: gather them on one device
            device = next((self.sums[k].device for k in tensors
                           if self.sums[k].device.type != "cpu"), torch.device("cpu"))
            read = torch.stack([self.sums[k].float().reshape(()).to(device)
                                for k in tensors]).tolist()
            values.update(zip(tensors, read))
        row = dict(self.last)
        row.update({k: values[k] / self.counts[k] for k in values})
        row["skipped"] = self.skipped
        row["it_per_s"] = self.steps / values["seconds"]
        self._reset()
        return row


class TrainingLog:
    """train_log.csv: one row per logged step. Stages log different terms (BCP's pre-training
    has no mix losses), so a row with new columns rewrites the file once under the union header;
    a resumed run continues under the header already on disk."""

    def __init__(self, path: Path, trailing: list[str]):
        self.path = path
        self.trailing = trailing  # columns kept last (val_dice)
        self.fields = None
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                self.fields = next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        if self.fields is None:
            self.fields = [k for k in row if k not in self.trailing] + self.trailing
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.fields).writeheader()
        new = [k for k in row if k not in self.fields]
        if new:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            head = [k for k in self.fields + new if k not in self.trailing]
            self.fields = head + [k for k in self.trailing if k in self.fields + new]
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.fields)
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


class Trainer:
    """One run. The constructor checks everything it can (config, method, hparams, net options,
    split, data, device) and touches no file; `run()` then trains, resumes or refuses."""

    def __init__(self, config: dict, dataset: str, method: str, ratio: float, seed: int,
                 out: str | Path | None = None, *, iterations: int | None = None,
                 device: str | None = None, overrides: dict[str, Any] | None = None,
                 force: bool = False, progress: bool = True, root: str | Path = "."):
        self.config = config
        self.dataset = dataset
        self.spec = get_spec(dataset)
        self.dcfg = dataset_config(config, dataset)
        recipe = resolve_recipe(config, dataset, method, overrides=overrides,
                                iterations=iterations)
        self.method_name = method  # a registered method, or a variant of one (config variants)
        self.method_cls = recipe.method_cls
        self.train_cfg = recipe.train_cfg
        self.hparams = recipe.hparams
        self.selection = recipe.selection
        self.augmentation = recipe.augmentation
        self.stages = recipe.stages
        self.settings = recipe.settings
        self.init_perturbation = recipe.init_perturbation
        self.noise_floor_of = recipe.noise_floor_of
        self.stage_starts = list(itertools.accumulate([0] + [s.iterations for s in self.stages]))
        self.total = self.stage_starts[-1]
        self.ratio = float(ratio)
        self.ratio_tag = ratio_tag(ratio)
        self.seed = seed
        self.progress = progress
        self.force = force
        self.layout = Layout(config, root)
        self.split_path = self.layout.splits(dataset, seed)
        split = read_split(self.split_path)
        if self.ratio_tag not in split["labeled"]:
            raise ConfigError(f"{self.split_path} has no labeled subset for ratio {self.ratio_tag} "
                              f"(has {', '.join(split['labeled'])}): add it to the config's ratios "
                              "and rerun `agcl splits`")
        if self.selection == "best_val" and not split["val"]:
            raise ConfigError(f"datasets.{dataset}.selection is best_val but {self.split_path} has "
                              f"no val cases (set datasets.{dataset}.val_cases > 0)")
        load_index(self.layout.processed(dataset))  # fails now, naming the file, if missing
        self.device = resolve_device(device or config.get("device", "auto"))
        self.amp_dtype = resolve_amp(self.train_cfg["amp"], self.device)
        self.deterministic = resolve_deterministic(self.train_cfg["deterministic"], self.device)
        self.data_device: torch.device | None = None  # decided with the data, in _prepare
        self.folder = RunFolder(out if out is not None
                                else self.layout.run(dataset, method, self.ratio, seed))
        self.out = self.folder.path
        self.identity = run_identity(dataset, method, self.ratio, seed, self.settings)
        self._warn_degenerate_bf16_cpu()

    def _warn_degenerate_bf16_cpu(self) -> None:
        # oneDNN's bf16 convolution on AVX512-BF16/AMX CPUs is wrong when the innermost output
        # size is 1 with a stride > 1 (pytorch#169688): a 3D patch whose last side is 16 reaches
        # exactly that at the net's fourth downsampling. The non-finite guard catches NaNs, not
        # silently wrong values, so say it up front.
        if (self.device.type == "cpu" and self.amp_dtype == torch.bfloat16
                and len(self.train_cfg["patch"]) == 3 and self.train_cfg["patch"][-1] // 16 == 1):
            log.warning("bf16 autocast on CPU with a patch whose last side is 16: some CPUs' "
                        "oneDNN bf16 kernels compute this shape wrongly; prefer amp: off on CPU")

    # ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        with self.folder.lock():
            self.folder.remove_temporaries()
            if self.folder.is_finished() and not self.force:
                self.folder.finished_meta()  # restores run.json if a kill left it out
                raise RunExistsError(f"{self.folder.file(FINAL)} exists: this run is finished "
                                     "(pass --force to train it again from scratch)")
            resuming = self.folder.file(LAST).exists() and not self.force
            if resuming:
                saved = self.folder.load_checkpoint(LAST, mmap=True)
                diffs = identity_differences(saved.get("identity", {}), self.identity,
                                             saved.get("settings"), self.settings)
                if diffs:
                    raise RunMismatchError(
                        f"{self.folder.file(LAST)} belongs to another run: {'; '.join(diffs)}. "
                        "Use another --out folder, or pass --force to discard it and start over")
                if "streams" not in saved:
                    raise RunMismatchError(
                        f"{self.folder.file(LAST)} was written by an older version (no random "
                        "stream states, expected key 'streams'): it cannot resume exactly. Pass "
                        "--force to discard it and start over")
            parts = self._prepare()
            # Only now, with data, method and optimiser ready, is anything old removed: a fresh
            # start (or --force) leaves nothing stale beside the new run.
            if not resuming:
                self.folder.clear()
            resume = self.folder.load_checkpoint(LAST, map_location=self.device) if resuming else None
            return self._train(parts, resume)

    def _prepare(self) -> dict:
        seed_everything(self.seed, self.device, self.deterministic)
        split = read_split(self.split_path)
        processed = self.layout.processed(self.dataset)
        data = load_training_set(processed, split, self.ratio_tag, self.train_cfg["patch"])
        val_cases = load_cases(processed, split["val"]) if split["val"] else []
        # The method's named random streams (agcl.random_streams), checkpointed with the run.
        streams = RandomStreams(self.seed)
        with building(streams):
            method = self.method_cls(self.spec, self.hparams, self.dcfg["net"],
                                     self.stages[-1].iterations).to(self.device)
        if self.init_perturbation == "ulp":  # deterministic: draws no random number
            perturb_one_ulp(method)
        if self.train_cfg["channels_last"]:
            # Applies to the conv weights of the spatial rank (4-D for 2D nets, 5-D for 3D ones).
            method.to(memory_format=channels_last_format(2 + len(self.train_cfg["patch"])))
        labeled_bs = self.train_cfg["labeled_batch_size"]
        unlabeled_bs = self.train_cfg["batch_size"] - labeled_bs if method.uses_unlabeled else 0
        self.data_device = data_device(self.train_cfg["data_placement"], self.device,
                                       training_set_bytes(data, unlabeled=unlabeled_bs > 0))
        return {
            "split": split, "data": data, "val_cases": val_cases, "method": method,
            "streams": streams,
            "sampler": PatchSampler(data, self.train_cfg["patch"], labeled_bs, unlabeled_bs,
                                    self.seed, self.augmentation, device=self.data_device),
            "optimizer": torch.optim.SGD(method.trainable_parameters(), lr=self.train_cfg["lr"],
                                         momentum=self.train_cfg["momentum"],
                                         weight_decay=self.train_cfg["weight_decay"]),
            "scaler": torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16),
        }

    def _train(self, parts: dict, resume: dict | None) -> dict:
        split, data, val_cases, method = (parts[k] for k in ("split", "data", "val_cases", "method"))
        sampler, optimizer, scaler = parts["sampler"], parts["optimizer"], parts["scaler"]
        streams = parts["streams"]
        state = {"step": 0, "stage": 0, "best_val": -math.inf, "best_step": None,
                 "run_id": uuid.uuid4().hex, "train_seconds": 0.0, "stage_start_seconds": 0.0,
                 "resumed_at": [],
                 "skipped": 0, "skipped_steps": [], "consecutive_skips": 0, "stages": []}
        if resume is not None:
            method.load_state_dict(resume["method"])
            optimizer.load_state_dict(resume["optimizer"])
            scaler.load_state_dict(resume["scaler"])
            sampler.load_state_dict(resume["sampler"])
            checkpoint.set_rng_states(resume["rng"])
            streams.load_state_dict(resume["streams"])
            state = resume["state"]
            state["resumed_at"].append(state["step"])
            log.info("resuming %s at step %d", self.out, state["step"])
            method.start_stage(self.stages[state["stage"]].name, fresh=False)
        else:
            method.start_stage(self.stages[0].name, fresh=True)
        self._truncate_log(state["step"])
        names = {id(p): n for n, p in method.named_parameters()}
        trainable = [(names.get(id(p), "?"), p) for p in method.trainable_parameters()]

        train_log = TrainingLog(self.out / LOG_CSV, ["val_dice"] if val_cases else [])
        board = _tensorboard_writer(self.out) if self.train_cfg["tensorboard"] else None
        bar = tqdm(total=self.total, initial=state["step"], disable=not self.progress,
                   desc=f"{self.dataset}/{method.name}/r{self.ratio_tag}/s{self.seed}", unit="it")
        method.train()
        segment_start, seconds_before = time.perf_counter(), state["train_seconds"]
        saved_step = state["step"]  # the step a failed write would resume from
        step_log = StepLog()
        with bar:
            for step in range(state["step"], self.total):
                if step == self.stage_starts[state["stage"] + 1]:  # the previous stage is done
                    self._next_stage(method, optimizer, state)
                stage = self.stages[state["stage"]]
                local = step - self.stage_starts[state["stage"]]
                values, skipped = self._step(method, trainable, sampler, optimizer, scaler, stage,
                                             local, state)
                step_log.add(values, skipped)
                state["step"] = step + 1
                state["train_seconds"] = seconds_before + time.perf_counter() - segment_start
                stage_done = local + 1 == stage.iterations
                val_dice = None
                if val_cases and ((local + 1) % self.train_cfg["val_every"] == 0 or stage_done):
                    val_dice = self._validate(method, val_cases)
                    if val_dice > state["best_val"]:
                        state["best_val"], state["best_step"] = val_dice, state["step"]
                        self._save_best(method, optimizer, state, saved_step)
                    method.train()
                if (state["step"] % self.train_cfg["log_every"] == 0 or val_dice is not None
                        or stage_done):
                    row = step_log.read()
                    if val_dice is not None:
                        row["val_dice"] = val_dice
                    train_log.write(row)
                    if board is not None:
                        for key, value in row.items():
                            if key not in ("step", "stage"):
                                board.add_scalar(key, value, state["step"])
                    bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", stage=stage.name,
                                    refresh=False)
                bar.update(1)
                if state["step"] % self.train_cfg["checkpoint_every"] == 0 and state["step"] < self.total:
                    self.folder.save_checkpoint(LAST, {
                        "identity": self.identity, "settings": self.settings,
                        "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "sampler": sampler.state_dict(),
                        "rng": checkpoint.rng_states(), "streams": streams.state_dict(),
                        "state": state,
                    }, resume_step=saved_step)
                    saved_step = state["step"]
        if board is not None:
            board.close()

        state["stages"].append(self._stage_record(state))
        meta = self._metadata(method, state, data, split)
        # The rename of ckpt_final.pt is what makes the run finished; it carries the metadata, so
        # run.json (written next) can always be restored from it.
        self.folder.save_checkpoint(FINAL, {**self._inference_payload(method, state), "run": meta},
                                    resume_step=saved_step)
        write_json(self.out / RUN_JSON, meta)
        for name in (LAST, PRETRAIN_BEST):
            (self.out / name).unlink(missing_ok=True)
        return meta

    def _save_best(self, method, optimizer, state: dict, saved_step: int) -> None:
        if state["stage"] < len(self.stages) - 1:  # a pre-training stage: the whole method state
            if self.selection == "best_val":
                # with the optimiser's state, which a next stage that keeps it loads with the
                # weights (BCP's ACDC code: save_net_opt at the best val, load_net_opt after)
                self.folder.save_checkpoint(PRETRAIN_BEST, {
                    "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": state["step"], "run_id": state["run_id"],
                    "identity": self.identity}, resume_step=saved_step)
        else:
            self.folder.save_checkpoint(BEST, self._inference_payload(method, state),
                                        resume_step=saved_step)

    def _stage_record(self, state: dict) -> dict:
        """What run.json says of the stage that just ended, and which weights it handed on."""
        stage = self.stages[state["stage"]]
        best = self.selection == "best_val" and state["best_step"] is not None
        return {"name": stage.name, "iterations": stage.iterations, **stage.schedule,
                "first_step": self.stage_starts[state["stage"]] + 1,
                "last_step": self.stage_starts[state["stage"] + 1],
                "selection": self.selection,
                "selected_step": state["best_step"] if best else state["step"],
                "selected_val_dice": state["best_val"] if best else None,
                # wall time of the stage's steps, validations and checkpoints (as train_seconds)
                "seconds": state["train_seconds"] - state.get("stage_start_seconds", 0.0)}

    def _next_stage(self, method, optimizer, state: dict) -> None:
        """Hand the selected weights of the finished stage to the next one, which restarts its
        schedule and, unless it keeps it, the optimiser's momentum; the selection policy (last,
        or best on val, never test) picks the weights."""
        state["stages"].append(self._stage_record(state))
        state["stage_start_seconds"] = state["train_seconds"]
        saved = None
        if self.selection == "best_val" and state["best_step"] is not None:
            saved = self.folder.load_checkpoint(PRETRAIN_BEST, map_location=self.device)
            method.load_state_dict(saved["method"])
        state["stage"] += 1
        if not self.stages[state["stage"]].keep_optimizer_state:
            optimizer.state.clear()
        elif saved is not None:  # the momentum of the selected weights, not of the last step
            optimizer.load_state_dict(saved["optimizer"])
        state["best_val"], state["best_step"] = -math.inf, None
        method.start_stage(self.stages[state["stage"]].name, fresh=True)
        method.train()
        log.info("%s: stage '%s' starts at step %d", self.out, self.stages[state["stage"]].name,
                 state["step"] + 1)

    # ----------------------------------------------------------------------------------------
    def _step(self, method, trainable, sampler, optimizer, scaler, stage, step: int,
              state: dict) -> tuple[dict, bool]:
        """One optimiser step at `step` of `stage` (or a skipped one, by the non-finite policy);
        returns the step's log values (tensors stay on the device) and whether it was skipped.

        The step reads one value back from the device, whether the loss and every gradient are
        finite (GradScaler's fp16 step reads its own): the skip decision must precede the update.
        """
        tic = time.perf_counter()
        # Dropout and any draw without a stream start each step from (seed, step), whatever
        # other methods (or earlier steps) drew: common random numbers across methods.
        seed_globals(self.seed, state["step"])
        x_l, y_l, x_u = sampler.next_batch()
        channels_last = self.train_cfg["channels_last"]
        batch = Batch(_to_device(x_l, self.device, channels_last), _to_device(y_l, self.device),
                      _to_device(x_u, self.device, channels_last))
        # Host time to draw, augment and hand over the batch (GPU work and copies run
        # asynchronously, so with the training set on the GPU this is launch time only).
        data_seconds = time.perf_counter() - tic
        lr = learning_rate(stage.schedule, step, stage.iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, logs = method.train_step(batch, step)
        loss_value = loss.detach()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        finite = torch.isfinite(loss_value)
        if not scaler.is_enabled():  # fp16: GradScaler skips steps with inf/NaN gradients itself
            finite = finite & gradients_finite(trainable)
        problem = None if bool(finite) else self._non_finite_problem(loss_value, logs, trainable)
        if problem is None:
            scaler.step(optimizer)
            scaler.update()
            method.after_optimizer_step(step)
            state["consecutive_skips"] = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self._non_finite(step, problem, state)
        values = {"step": state["step"] + 1, "stage": stage.name, "stage_step": step + 1, "lr": lr,
                  "loss": loss_value, **logs, "seconds": time.perf_counter() - tic,
                  "data_seconds": data_seconds}
        return values, problem is not None

    def _non_finite_problem(self, loss: torch.Tensor, logs: dict, trainable) -> str | None:
        """What is not finite, read exactly (None: only the fused gradient norm overflowed)."""
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items())
            return f"the loss is {float(loss)} ({terms})"
        bad = first_nonfinite_gradient(trainable)
        if bad is not None:
            return f"the gradient of {bad} is not finite (the loss is {float(loss):.4g})"
        return None

    def _non_finite(self, step: int, problem: str, state: dict) -> None:
        where = (f"{self.dataset}/{self.method_cls.name} r{self.ratio_tag} s{self.seed}, "
                 f"step {state['step'] + 1}")
        if self.train_cfg["nonfinite"] == "stop":
            raise NonFiniteError(f"{where}: {problem}; stopping (train.nonfinite: stop)")
        state["skipped"] += 1
        state["consecutive_skips"] += 1
        if len(state["skipped_steps"]) < LISTED_SKIPS:
            state["skipped_steps"].append(state["step"] + 1)
        limit = self.train_cfg["max_consecutive_skips"]
        if state["consecutive_skips"] >= limit:
            raise NonFiniteError(f"{where}: {problem}; {limit} steps in a row skipped, stopping "
                                 "(train.max_consecutive_skips)")
        log.warning("%s: %s; step skipped (train.nonfinite: skip)", where, problem)

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

    def _inference_payload(self, method, state: dict) -> dict:
        """What evaluation needs: the inference network alone, how to rebuild it, whose it is."""
        return {
            "net_name": method.net_name(self.spec),
            "net_kwargs": dict(self.dcfg["net"]),
            "in_channels": self.spec.in_channels,
            "num_classes": self.spec.num_classes,
            "state_dict": method.inference_net().state_dict(),
            "step": state["step"],
            "method": self.method_name,
            "identity": self.identity,
            "run_id": state["run_id"],
        }

    def _metadata(self, method, state: dict, data, split: dict) -> dict:
        return {
            "run_id": state["run_id"],
            "identity": self.identity,
            "dataset": self.dataset,
            "method": self.method_name,
            "base_method": self.method_cls.name,
            # a noise-floor twin: this method's run again with its initial weights one ulp away
            "noise_floor_of": self.noise_floor_of,
            "init_perturbation": self.init_perturbation,
            "ratio": self.ratio,
            "seed": self.seed,
            "iterations": self.total,
            "stages": state["stages"],
            "hparams": self.hparams,
            "train": self.train_cfg,
            "net": {"name": self.method_cls.net_name(self.spec), **self.dcfg["net"]},
            # the evaluated network's, and everything the optimiser updates (e.g. MC-Net+'s
            # extra decoders, projection heads)
            "parameters": sum(p.numel() for p in method.inference_net().parameters()),
            "trainable_parameters": sum(p.numel() for p in method.trainable_parameters()),
            "labeled": data.labeled_ids,
            "n_labeled": len(data.labeled_ids),
            "n_unlabeled": len(data.unlabeled_ids),
            "n_val": len(split["val"]),
            "selection": self.selection,
            "best_val_dice": None if state["best_step"] is None else state["best_val"],
            "best_val_step": state["best_step"],
            "device": str(self.device),
            "data_on": str(self.data_device or "host"),
            "deterministic": self.deterministic,
            "cpu_numerics": cpu_numerics(),
            "amp": amp_name(self.amp_dtype),
            "train_seconds": state["train_seconds"],
            "resumed_at_steps": state["resumed_at"],
            "nonfinite_policy": self.train_cfg["nonfinite"],
            "skipped_steps": state["skipped"],
            "skipped_step_numbers": state["skipped_steps"],
            "code_version": code_version(),
            "config_name": self.config["name"],
            "config": self.config,
        }


@torch.no_grad()
def perturb_one_ulp(module: torch.nn.Module) -> None:
    """Move every floating-point parameter (student, teacher, heads) one ulp towards +inf: the
    noise floor's perturbation, nothing in expectation, yet enough for a small run to diverge
    chaotically from its unperturbed twin."""
    for p in module.parameters():
        if p.is_floating_point():
            p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))


def gradients_finite(named_params) -> torch.Tensor:
    """A 0-d bool tensor on the device: is every gradient finite? One fused norm over all of
    them is finite iff they are, barring an overflow of the squares (first_nonfinite_gradient
    then clears it)."""
    grads = [p.grad for _, p in named_params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True))


def first_nonfinite_gradient(named_params) -> str | None:
    """Name of the first parameter whose gradient holds NaN/Inf, checked exactly."""
    grads = [(name, p.grad) for name, p in named_params if p.grad is not None]
    if not grads:
        return None
    finite = torch.stack([torch.isfinite(g).all() for _, g in grads])
    if bool(finite.all()):
        return None
    return grads[int((~finite).nonzero()[0])][0]
