"""One training run's folder: its file names and the rules about them, in one place.

The trainer writes it, evaluation and aggregation read it; all three go through this module, so
"finished", "belongs to this run" and "what a forced retrain removes" mean one thing everywhere.

    <results_dir>/<name>/runs/<dataset>/<method>/r<ratio>/s<seed>/
      ckpt_last.pt     resume point (the whole training state); removed once the run is finished
      ckpt_best.pt     best-on-validation inference weights (selection: best_val)
      ckpt_pretrain_best.pt  best-on-validation state of a pre-training stage, handed to the
                       main stage under best_val; removed once the run is finished
      ckpt_final.pt    inference weights plus the run's metadata. Its atomic rename is the one
                       fact that makes a run finished.
      run.json         readable copy of that metadata; restored from ckpt_final.pt when missing
      train_log.csv, tensorboard/
      metrics.json, predictions.npz   evaluation of one finished model, stamped with its run_id
      .lock            held by the trainer working in the folder

Every checkpoint carries the run's identity (dataset, method, ratio, seed and a hash of the
resolved training settings) and its run_id (new for each training from scratch): a resume under
other settings is refused, and a metrics.json counts only for the model it was computed from.
torch is imported lazily, so the Snakemake rules can import the file names cheaply.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agcl.common.utils import atomic_path, human_bytes, write_json

log = logging.getLogger("agcl.runtime.runfolder")

LAST = "ckpt_last.pt"
BEST = "ckpt_best.pt"
PRETRAIN_BEST = "ckpt_pretrain_best.pt"
FINAL = "ckpt_final.pt"
RUN_JSON = "run.json"
LOG_CSV = "train_log.csv"
METRICS_JSON = "metrics.json"
PREDICTIONS = "predictions.npz"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
# Everything a forced retrain removes: the model, its training record and what was derived from it.
OWNED_FILES = (LAST, BEST, PRETRAIN_BEST, FINAL, RUN_JSON, LOG_CSV, METRICS_JSON, PREDICTIONS)
IDENTITY_KEYS = ("dataset", "method", "ratio", "seed")
# atomic_path's temporaries: ".<name>.<random>.tmp" beside the file they will replace.
TEMPORARY_GLOB = ".*.tmp"


class RunFolderError(RuntimeError):
    """A run folder is not in the state a command needs; the message says what to do."""


class UnfinishedRunError(RunFolderError):
    pass


class RunExistsError(RunFolderError):
    pass


class RunMismatchError(RunFolderError):
    pass


class RunBusyError(RunFolderError):
    pass


class CheckpointWriteError(RunFolderError):
    pass


def settings_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of resolved settings (key order and formatting do not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_identity(dataset: str, method: str, ratio: float, seed: int,
                 settings: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Who a run is: dataset, method, ratio, seed, the hash of its training settings and, where
    given, `data_hash`: the hash of the data it trains on (its split and the processed index)."""
    identity = {"dataset": dataset, "method": method, "ratio": float(ratio), "seed": int(seed),
                "settings_hash": settings_hash(settings)}
    if data is not None:
        identity["data_hash"] = settings_hash(data)
    return identity


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def identity_differences(saved: dict, expected: dict, saved_settings: dict | None = None,
                         expected_settings: dict | None = None) -> list[str]:
    """Readable differences between a checkpoint's identity and the one a command expects."""
    diffs = [f"{key} is {saved.get(key)!r} in the checkpoint but {expected[key]!r} here"
             for key in IDENTITY_KEYS if saved.get(key) != expected[key]]
    # data_hash: older checkpoints have none (nothing to compare)
    if "data_hash" in saved and "data_hash" in expected and \
            saved["data_hash"] != expected["data_hash"]:
        diffs.append("the data differ (another split or processed data than the checkpoint "
                     f"trained on: data_hash {saved['data_hash']} there, {expected['data_hash']} "
                     "here)")
    if saved.get("settings_hash") != expected["settings_hash"]:
        old, new = _flatten(saved_settings or {}), _flatten(expected_settings or {})
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        diffs.append(f"the training settings differ ({shown}{more})" if changed
                     else "the training settings differ")
    return diffs


def _is_disk_full(exc: BaseException) -> bool:
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    # torch.save reports a short write from its zip writer this way, without an errno.
    text = str(exc)
    return "unexpected pos" in text or "file write failed" in text


class RunFolder:
    """The files of one run; see the module docstring for what each one means."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    # --- state ----------------------------------------------------------------------------
    def is_finished(self) -> bool:
        return self.file(FINAL).is_file()

    def foreign_entries(self) -> list[str]:
        """What the folder holds if it is not a run (nothing the trainer writes first: no
        checkpoint, run.json or training log) but is not empty either: a fresh start here would
        remove what it owns (metrics.json, tensorboard/...) from someone else's folder. Empty
        when the folder is absent, empty (but for the lock) or a run."""
        if not self.path.is_dir():
            return []
        markers = (LAST, BEST, PRETRAIN_BEST, FINAL, RUN_JSON, LOG_CSV)
        if any(self.file(name).exists() for name in markers):
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def last_checkpoint_step(self) -> int | None:
        """Step of ckpt_last.pt, read without loading its tensors (None when there is none)."""
        if not self.file(LAST).is_file():
            return None
        try:
            return int(self.load_checkpoint(LAST, mmap=True)["state"]["step"])
        except (RunFolderError, KeyError, TypeError, ValueError):
            return None

    def unfinished_message(self) -> str:
        step = self.last_checkpoint_step()
        if step is not None:
            return (f"run {self.path} is unfinished (no {FINAL}; its last checkpoint is at step "
                    f"{step}): run the same `agcl train` command again to resume it from {LAST}")
        if self.path.is_dir() and any(self.file(n).exists() for n in (LOG_CSV, BEST)):
            return (f"run {self.path} is unfinished (stopped before its first checkpoint): run the "
                    "same `agcl train` command again to train it")
        return f"{self.path} holds no finished run (no {FINAL}): train it with `agcl train` first"

    def finished_meta(self) -> dict:
        """The run's metadata; run.json is restored from ckpt_final.pt if a kill left it out."""
        if not self.is_finished():
            raise UnfinishedRunError(self.unfinished_message())
        path = self.file(RUN_JSON)
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError as exc:
                log.warning("%s is unreadable (%s); restoring it from %s", path, exc, FINAL)
        meta = self.load_checkpoint(FINAL)["run"]
        write_json(path, meta)
        log.warning("restored %s from %s", path, FINAL)
        return meta

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, name: str, payload: dict, resume_step: int | None = None) -> None:
        """torch.save to a temp name, then rename: a failure keeps the previous file intact."""
        import torch

        path = self.file(name)
        try:
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        except Exception as exc:
            raise CheckpointWriteError(self._write_failure(path, exc, resume_step)) from exc

    def _write_failure(self, path: Path, exc: BaseException, resume_step: int | None) -> str:
        try:
            free = f"{human_bytes(shutil.disk_usage(path.parent).free)} free there"
        except OSError:
            free = "free space unknown"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        cause = "the disk is full" if _is_disk_full(exc) else f"the write failed ({first_line})"
        resume = (f"it resumes from step {resume_step}" if resume_step
                  else "it starts again from the beginning")
        return (f"cannot write checkpoint {path}: {cause} ({free}); free some space and run the "
                f"same command again ({resume})")

    def load_checkpoint(self, name: str, map_location: Any = "cpu", mmap: bool = False) -> dict:
        import torch

        path = self.file(name)
        if not path.is_file():
            raise UnfinishedRunError(self.unfinished_message() if name == FINAL
                                     else f"{path} is missing")
        try:
            # weights_only: tensors and plain containers, no unpickling of arbitrary objects, so a
            # planted file cannot run code (our payloads hold nothing else: engine/checkpoint.py)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RunFolderError(f"{path}: cannot read this checkpoint ({first_line}); delete it "
                                 "and train the run again") from exc

    # --- housekeeping ---------------------------------------------------------------------
    def remove_temporaries(self) -> list[Path]:
        """Delete half-written files a killed process left behind (atomic_path's temp names)."""
        removed = []
        for tmp in sorted(self.path.glob(TEMPORARY_GLOB)):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
        if removed:
            log.info("removed %d unfinished temporary file(s) in %s", len(removed), self.path)
        return removed

    def clear(self) -> None:
        """Remove the model, its training record and everything derived from it."""
        for name in OWNED_FILES:
            self.file(name).unlink(missing_ok=True)
        shutil.rmtree(self.file(TENSORBOARD), ignore_errors=True)
        self.remove_temporaries()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive while a trainer works here; the OS releases it when the process dies."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.file(LOCK), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusyError(f"another `agcl train` is working in {self.path}; wait for it "
                                   "or stop it first") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- evaluation records ---------------------------------------------------------------
    def evaluated(self) -> tuple[dict | None, dict | None, str]:
        """(metrics, run metadata, "") when ckpt_final.pt, run.json and metrics.json belong to
        one run; (None, None, reason) otherwise. Reads only the two JSON files."""
        metrics_path = self.file(METRICS_JSON)
        if not metrics_path.is_file():
            return None, None, "not evaluated (no metrics.json)"
        if not self.is_finished():
            return None, None, f"metrics.json without a finished model ({FINAL} missing)"
        try:
            meta = json.loads(self.file(RUN_JSON).read_text())
            metrics = json.loads(metrics_path.read_text())
        except FileNotFoundError:
            return None, None, f"{RUN_JSON} missing: run `agcl evaluate` again (it restores it)"
        except ValueError as exc:
            return None, None, f"unreadable JSON ({exc})"
        run_id = meta.get("run_id")
        if run_id is None or metrics.get("run_id") != run_id:
            return None, None, (f"metrics.json belongs to another model (run_id "
                                f"{metrics.get('run_id')} vs {run_id} in run.json): evaluate the "
                                "run again")
        return metrics, meta, ""
