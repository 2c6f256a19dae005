"""The one training loop every method goes through, top to bottom.

The Trainer resolves the run's recipe and checks everything it can before touching a file;
`run()` then trains, resumes or refuses. Around the loop: agcl.engine.prepare builds the parts,
agcl.engine.update applies each step's update (lr, autocast, backward, non-finite policy),
agcl.engine.logs writes the logs and agcl.engine.checkpoint the checkpoint payloads; the method
only turns a batch into a loss. What the run folder holds and when a run counts as finished is
agcl.runtime.runfolder's business.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agcl.common.utils import ratio_tag, write_json
from agcl.config import ConfigError, Layout, dataset_config
from agcl.config.recipe import resolve_recipe
from agcl.data.loaders import read_split
from agcl.data.preprocess import load_index
from agcl.data.specs import get_spec
from agcl.engine import checkpoint
from agcl.engine.logs import RunLog
from agcl.engine.method_errors import method_code
from agcl.engine.prepare import PreparedRun, prepare
from agcl.engine.state import TrainingState
from agcl.engine.update import Updater
from agcl.methods.base import Batch
from agcl.nets.inference import dice_per_class, eval_window, predict_case
from agcl.runtime.devices import resolve_amp, resolve_deterministic, resolve_device, to_device
from agcl.runtime.random_streams import seed_globals
from agcl.runtime.runfolder import (
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

log = logging.getLogger("agcl.train")


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
                                iterations=iterations, ratio=ratio)
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
        self.device = resolve_device(device or config.get("device", "auto"))
        self.amp_dtype = resolve_amp(self.train_cfg["amp"], self.device)
        self.deterministic = resolve_deterministic(self.train_cfg["deterministic"], self.device)
        self.folder = RunFolder(out if out is not None
                                else self.layout.run(dataset, method, self.ratio, seed))
        self.out = self.folder.path
        self.identity = run_identity(dataset, method, self.ratio, seed, self.settings,
                                     data={"split": split, "index": load_index(
                                         self.layout.processed(dataset))})
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
            foreign = self.folder.foreign_entries()
            if foreign and not self.force:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                                  if len(foreign) > 5 else "")
                raise RunExistsError(
                    f"{self.folder.path} is not empty and holds no run ({shown}): training here "
                    "would replace what a run owns there. Use an empty or new --out folder, or "
                    "pass --force to train here anyway")
            resuming = self.folder.file(LAST).exists() and not self.force
            if resuming:
                self._check_resumable(self.folder.load_checkpoint(LAST, mmap=True))
            parts = prepare(self)
            # Only now, with data, method and optimiser ready, is anything old removed: a fresh
            # start (or --force) leaves nothing stale beside the new run.
            if not resuming:
                self.folder.clear()
            resume = self.folder.load_checkpoint(LAST, map_location=self.device) if resuming else None
            return self._train(parts, resume)

    def _check_resumable(self, saved: dict) -> None:
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

    def _train(self, parts: PreparedRun, resume: dict | None) -> dict:
        method, optimizer = parts.method, parts.optimizer
        state = TrainingState()
        if resume is not None:
            checkpoint.restore(parts, resume)
            state = TrainingState.from_dict(resume["state"])
            state.resumed_at.append(state.step)
            log.info("resuming %s at step %d", self.out, state.step)
        with method_code(method, self._where(state), "start_stage"):
            method.start_stage(self.stages[state.stage].name, fresh=resume is None)
        update = Updater(method, optimizer, parts.scaler, device=self.device,
                         amp_dtype=self.amp_dtype, nonfinite=self.train_cfg["nonfinite"],
                         max_consecutive_skips=self.train_cfg["max_consecutive_skips"],
                         where=self._run_name(), auxiliary=parts.auxiliary,
                         grad_reset=self.train_cfg["grad_reset"],
                         last_stage=len(self.stages) - 1)
        logs = RunLog(self.out / LOG_CSV, with_val=bool(parts.val_cases),
                      log_every=self.train_cfg["log_every"],
                      tensorboard_dir=self.out if self.train_cfg["tensorboard"] else None,
                      total=self.total, initial=state.step, progress=self.progress,
                      description=f"{self.dataset}/{method.name}/r{self.ratio_tag}/s{self.seed}")
        method.train()
        segment_start, seconds_before = time.perf_counter(), state.train_seconds
        saved_step = state.step  # the step a failed write would resume from
        try:
            for step in range(state.step, self.total):
                if step == self.stage_starts[state.stage + 1]:  # the previous stage is done
                    self._next_stage(parts, state)
                stage = self.stages[state.stage]
                local = step - self.stage_starts[state.stage]
                values, skipped = self._step(method, update, parts.sampler, stage, local, state)
                state.step = step + 1
                state.train_seconds = seconds_before + time.perf_counter() - segment_start
                stage_done = local + 1 == stage.iterations
                val_dice, other_val = None, None
                if parts.val_cases and ((local + 1) % self.train_cfg["val_every"] == 0
                                        or stage_done):
                    val_dice = self._validate(method.inference_net(), parts.val_cases)
                    other_val = {n.name: self._validate(n.module, parts.val_cases)
                                 for n in method.trained_networks()
                                 if n.validate and n.module is not method.inference_net()}
                    if val_dice > state.best_val:
                        state.best_val, state.best_step = val_dice, state.step
                        self._save_best(parts, state, saved_step)
                    method.train()
                logs.step(values, skipped, val_dice=val_dice, stage_done=stage_done,
                          other_val=other_val)
                if (state.step % self.train_cfg["checkpoint_every"] == 0
                        and state.step < self.total):
                    self.folder.save_checkpoint(LAST, checkpoint.resume_payload(self, parts, state),
                                                resume_step=saved_step)
                    saved_step = state.step
        finally:
            logs.close()

        state.stages.append(self._stage_record(state))
        meta = checkpoint.run_metadata(self, parts, state)
        if meta["unread_hparams"]:
            log.warning("%s: hyperparameters declared by %s but never read in this run: %s "
                        "(a value set for them changes the recipe's hash, not the training)",
                        self._run_name(), self.method_cls.name,
                        ", ".join(meta["unread_hparams"]))
        # The rename of ckpt_final.pt is what makes the run finished; it carries the metadata, so
        # run.json (written next) can always be restored from it.
        self.folder.save_checkpoint(FINAL, {**checkpoint.inference_payload(self, method, state),
                                            "run": meta}, resume_step=saved_step)
        write_json(self.out / RUN_JSON, meta)
        for name in (LAST, PRETRAIN_BEST):
            (self.out / name).unlink(missing_ok=True)
        return meta

    def _run_name(self) -> str:
        return f"{self.dataset}/{self.method_cls.name} r{self.ratio_tag} s{self.seed}"

    def _where(self, state: TrainingState) -> str:
        return (f"{self._run_name()}, stage {self.stages[state.stage].name}, "
                f"step {state.step + 1}")

    def _step(self, method, update: Updater, sampler, stage, step: int,
              state: TrainingState) -> tuple[dict, bool]:
        """One optimiser step at `step` of `stage` (or a skipped one, by the non-finite policy);
        returns the step's log values (tensors stay on the device) and whether it was skipped."""
        tic = time.perf_counter()
        # Dropout and any draw without a stream start each step from (seed, step), whatever
        # other methods (or earlier steps) drew: common random numbers across methods.
        seed_globals(self.seed, state.step)
        x_l, y_l, x_u = sampler.next_batch()
        channels_last = self.train_cfg["channels_last"]
        batch = Batch(to_device(x_l, self.device, channels_last), to_device(y_l, self.device),
                      to_device(x_u, self.device, channels_last),
                      [to_device(x, self.device, channels_last)
                       for x in sampler.next_extra_unlabeled()])
        # Host time to draw, augment and hand over the batch (GPU work and copies run
        # asynchronously, so with the training set on the GPU this is launch time only).
        data_seconds = time.perf_counter() - tic
        lr, loss, logs, skipped = update(method, batch, stage.schedule, step, stage.iterations,
                                         state, stage.name)
        values = {"step": state.step + 1, "stage": stage.name, "stage_step": step + 1, "lr": lr,
                  "loss": loss, **logs, "seconds": time.perf_counter() - tic,
                  "data_seconds": data_seconds}
        return values, skipped

    def _save_best(self, parts: PreparedRun, state: TrainingState, saved_step: int) -> None:
        if state.stage < len(self.stages) - 1:  # a pre-training stage: the whole method state
            if self.selection == "best_val":
                self.folder.save_checkpoint(
                    PRETRAIN_BEST, checkpoint.pretrain_best_payload(self, parts, state),
                    resume_step=saved_step)
        else:
            self.folder.save_checkpoint(BEST, checkpoint.inference_payload(self, parts.method,
                                                                           state),
                                        resume_step=saved_step)

    def _stage_record(self, state: TrainingState) -> dict:
        """What run.json says of the stage that just ended, and which weights it handed on."""
        stage = self.stages[state.stage]
        best = self.selection == "best_val" and state.best_step is not None
        return {"name": stage.name, "iterations": stage.iterations, **stage.schedule,
                "first_step": self.stage_starts[state.stage] + 1,
                "last_step": self.stage_starts[state.stage + 1],
                "selection": self.selection,
                "selected_step": state.best_step if best else state.step,
                "selected_val_dice": state.best_val if best else None,
                # wall time of the stage's steps, validations and checkpoints (as train_seconds)
                "seconds": state.train_seconds - state.stage_start_seconds}

    def _next_stage(self, parts: PreparedRun, state: TrainingState) -> None:
        """Hand the selected weights of the finished stage to the next one, which restarts its
        schedule and, unless it keeps it, the optimiser's momentum; the selection policy (last,
        or best on val, never test) picks the weights."""
        method = parts.method
        optimizers = [parts.optimizer, *(optimizer for _, optimizer in parts.auxiliary.values())]
        state.stages.append(self._stage_record(state))
        state.stage_start_seconds = state.train_seconds
        saved = None
        if self.selection == "best_val" and state.best_step is not None:
            saved = self.folder.load_checkpoint(PRETRAIN_BEST, map_location=self.device)
            method.load_state_dict(saved["method"])
        state.stage += 1
        if not self.stages[state.stage].keep_optimizer_state:
            for optimizer in optimizers:
                optimizer.state.clear()
        elif saved is not None:  # the momentum of the selected weights, not of the last step
            parts.optimizer.load_state_dict(saved["optimizer"])
            checkpoint.load_auxiliary_states(parts.auxiliary, saved)
        state.best_val, state.best_step = -math.inf, None
        with method_code(method, self._where(state), "start_stage"):
            method.start_stage(self.stages[state.stage].name, fresh=True)
        method.train()
        log.info("%s: stage '%s' starts at step %d", self.out, self.stages[state.stage].name,
                 state.step + 1)

    def _validate(self, net, cases) -> float:
        """Mean foreground Dice of `net` on the validation cases."""
        eval_cfg = self.dcfg["eval"]
        patch, stride = eval_window(eval_cfg, self.train_cfg["patch"])
        scores = []
        for case in cases:
            pred = predict_case(net, case.image, self.spec.eval_mode,
                                self.spec.num_classes, patch, stride, self.device,
                                eval_cfg["window_batch"], self.amp_dtype)
            scores.append(np.mean(dice_per_class(pred, case.label, self.spec.num_classes)))
        return float(np.mean(scores))
