"""The one training loop every method goes through, top to bottom.

The Trainer resolves the run's recipe and checks everything it can before touching a file;
`run()` then trains, resumes or refuses. Around the loop: agcl.engine.prepare builds the parts,
agcl.engine.update applies each step's update (lr, autocast, backward, non-finite policy),
agcl.engine.logs writes the logs and agcl.engine.checkpoint the checkpoint payloads; the method
only turns a batch into a loss. What the run folder holds and when a run counts as finished is
agcl.runtime.runfolder's business.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agcl.common.utils import write_json
from agcl.config import Layout
from agcl.config.run import describe_run
from agcl.engine import checkpoint
from agcl.engine.logs import RunLog
from agcl.engine.method_errors import method_code
from agcl.engine.optimizers import hand_on_optimizer_state
from agcl.engine.prepare import PreparedRun, prepare
from agcl.engine.state import TrainingState
from agcl.engine.update import Updater
from agcl.methods.base import Batch
from agcl.nets.inference import dice_per_class, predict_case
from agcl.runtime.devices import to_device
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
)

log = logging.getLogger("agcl.train")


class Trainer:
    """One run. The constructor checks everything it can (config, method, hparams, net options,
    split, data, device) and touches no file; `run()` then trains, resumes or refuses."""

    def __init__(self, config: dict, dataset: str, method: str, ratio: float, seed: int,
                 out: str | Path | None = None, *, iterations: int | None = None,
                 device: str | None = None, overrides: dict[str, Any] | None = None,
                 force: bool = False, progress: bool = True, root: str | Path = "."):
        # everything the run is, typed and frozen (agcl.config.run); the Trainer adds only where
        # it writes and how it reports
        self.description = describe_run(config, dataset, method, ratio, seed,
                                            iterations=iterations, device=device,
                                            overrides=overrides, root=root)
        self.progress = progress
        self.force = force
        self.folder = RunFolder(out if out is not None
                                else Layout(config, root).run(dataset, method, float(ratio), seed))
        self.out = self.folder.path
        self.stage_starts = self.description.stage_starts
        self._warn_degenerate_bf16_cpu()

    def _warn_degenerate_bf16_cpu(self) -> None:
        # oneDNN's bf16 convolution on AVX512-BF16/AMX CPUs is wrong when the innermost output
        # size is 1 with a stride > 1 (pytorch#169688): a 3D patch whose last side is 16 reaches
        # exactly that at the net's fourth downsampling. The non-finite guard catches NaNs, not
        # silently wrong values, so say it up front.
        if (self.description.device.type == "cpu" and self.description.amp_dtype == torch.bfloat16
                and len(patch := self.description.train_cfg["patch"]) == 3
                and patch[-1] // 16 == 1):
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
            parts = prepare(self.description)
            # Only now, with data, method and optimiser ready, is anything old removed: a fresh
            # start (or --force) leaves nothing stale beside the new run.
            if not resuming:
                self.folder.clear()
            resume = (self.folder.load_checkpoint(LAST, map_location=self.description.device)
                      if resuming else None)
            return self._train(parts, resume)

    def _check_resumable(self, saved: dict) -> None:
        diffs = identity_differences(saved.get("identity", {}), self.description.identity,
                                     saved.get("settings"), self.description.recipe.settings)
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
            method.start_stage(self.description.stages[state.stage].name, fresh=resume is None)
        update = Updater(method, optimizer, parts.scaler, device=self.description.device,
                         amp_dtype=self.description.amp_dtype,
                         nonfinite=self.description.train_cfg["nonfinite"],
                         max_consecutive_skips=self.description.train_cfg["max_consecutive_skips"],
                         where=self.description.name, auxiliary=parts.auxiliary,
                         grad_reset=self.description.train_cfg["grad_reset"],
                         last_stage=len(self.description.stages) - 1)
        logs = RunLog(self.out / LOG_CSV, with_val=bool(parts.val_cases),
                      log_every=self.description.train_cfg["log_every"],
                      tensorboard_dir=(self.out if self.description.train_cfg["tensorboard"]
                                       else None),
                      total=self.description.total, initial=state.step, progress=self.progress,
                      description=f"{self.description.dataset}/{method.name}/"
                                  f"r{self.description.ratio_tag}/s{self.description.seed}")
        method.train()
        segment_start, seconds_before = time.perf_counter(), state.train_seconds
        saved_step = state.step  # the step a failed write would resume from
        try:
            for step in range(state.step, self.description.total):
                if step == self.stage_starts[state.stage + 1]:  # the previous stage is done
                    self._next_stage(parts, state)
                stage = self.description.stages[state.stage]
                local = step - self.stage_starts[state.stage]
                values, skipped = self._step(method, update, parts.sampler, stage, local, state)
                state.step = step + 1
                state.train_seconds = seconds_before + time.perf_counter() - segment_start
                stage_done = local + 1 == stage.iterations
                val_dice, other_val = None, None
                if parts.val_cases and ((local + 1) % self.description.train_cfg["val_every"] == 0
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
                if (state.step % self.description.train_cfg["checkpoint_every"] == 0
                        and state.step < self.description.total):
                    self.folder.save_checkpoint(LAST, checkpoint.resume_payload(
                        self.description, parts, state),
                                                resume_step=saved_step)
                    saved_step = state.step
        finally:
            logs.close()

        state.stages.append(self._stage_record(state))
        meta = checkpoint.run_metadata(self.description, parts, state)
        if meta["unread_hparams"]:
            log.warning("%s: hyperparameters declared by %s but never read in this run: %s "
                        "(a value set for them changes the recipe's hash, not the training)",
                        self.description.name, self.description.method_cls.name,
                        ", ".join(meta["unread_hparams"]))
        # The rename of ckpt_final.pt is what makes the run finished; it carries the metadata, so
        # run.json (written next) can always be restored from it.
        self.folder.save_checkpoint(FINAL, {**checkpoint.inference_payload(
            self.description, method, state),
                                            "run": meta}, resume_step=saved_step)
        write_json(self.out / RUN_JSON, meta)
        for name in (LAST, PRETRAIN_BEST):
            (self.out / name).unlink(missing_ok=True)
        return meta

    def _where(self, state: TrainingState) -> str:
        return (f"{self.description.name}, stage {self.description.stages[state.stage].name}, "
                f"step {state.step + 1}")

    def _step(self, method, update: Updater, sampler, stage, step: int,
              state: TrainingState) -> tuple[dict, bool]:
        """One optimiser step at `step` of `stage` (or a skipped one, by the non-finite policy);
        returns the step's log values (tensors stay on the device) and whether it was skipped."""
        tic = time.perf_counter()
        # Dropout and any draw without a stream start each step from (seed, step), whatever
        # other methods (or earlier steps) drew: common random numbers across methods.
        seed_globals(self.description.seed, state.step)
        x_l, y_l, x_u = sampler.next_batch()
        channels_last = self.description.train_cfg["channels_last"]
        device = self.description.device
        batch = Batch(to_device(x_l, device, channels_last), to_device(y_l, device),
                      to_device(x_u, self.description.device, channels_last),
                      [to_device(x, self.description.device, channels_last)
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
        if state.stage < len(self.description.stages) - 1:  # pre-training: the whole method state
            if self.description.recipe.selection == "best_val":
                self.folder.save_checkpoint(
                    PRETRAIN_BEST, checkpoint.pretrain_best_payload(
                        self.description, parts, state),
                    resume_step=saved_step)
        else:
            self.folder.save_checkpoint(BEST, checkpoint.inference_payload(
                self.description, parts.method, state), resume_step=saved_step)

    def _stage_record(self, state: TrainingState) -> dict:
        """What run.json says of the stage that just ended, and which weights it handed on."""
        stage = self.description.stages[state.stage]
        best = self.description.recipe.selection == "best_val" and state.best_step is not None
        return {"name": stage.name, "iterations": stage.iterations, **stage.schedule,
                "first_step": self.stage_starts[state.stage] + 1,
                "last_step": self.stage_starts[state.stage + 1],
                "selection": self.description.recipe.selection,
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
        if self.description.recipe.selection == "best_val" and state.best_step is not None:
            saved = self.folder.load_checkpoint(PRETRAIN_BEST, map_location=self.description.device)
            method.load_state_dict(saved["method"])
        state.stage += 1
        if not self.description.stages[state.stage].keep_optimizer_state:
            for optimizer in optimizers:
                optimizer.state.clear()
        else:
            if saved is not None:  # the momentum of the selected weights, not of the last step
                parts.optimizer.load_state_dict(saved["optimizer"])
                checkpoint.load_auxiliary_states(parts.auxiliary, saved)
            hand_on_optimizer_state(method, parts.optimizer)
        state.best_val, state.best_step = -math.inf, None
        with method_code(method, self._where(state), "start_stage"):
            method.start_stage(self.description.stages[state.stage].name, fresh=True)
        method.train()
        log.info("%s: stage '%s' starts at step %d", self.out,
                 self.description.stages[state.stage].name,
                 state.step + 1)

    def _validate(self, net, cases) -> float:
        """Mean foreground Dice of `net` on the validation cases, in the recorded window."""
        run = self.description
        patch, stride = run.validation_window
        scores = []
        for case in cases:
            pred = predict_case(net, case.image, run.spec.eval_mode, run.spec.num_classes, patch,
                                stride, run.device, run.window_batch, run.amp_dtype)
            scores.append(np.mean(dice_per_class(pred, case.label, run.spec.num_classes)))
        return float(np.mean(scores))
