"""What a run logs while it trains: the step log accumulated on the device, train_log.csv,
TensorBoard and the progress bar, behind one `RunLog` the training loop talks to."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

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


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from (they will be redone)."""
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


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError("train.tensorboard is true but the tensorboard package is missing "
                           "(pip install tensorboard)") from exc
    return SummaryWriter(log_dir=str(out / "tensorboard"))


class RunLog:
    """Every log of one run: steps are added as they finish, and a row (every `log_every`
    steps, at a validation, at the end of a stage) goes to the CSV, TensorBoard and the bar."""

    def __init__(self, csv_path: Path, *, with_val: bool, log_every: int, tensorboard_dir=None,
                 total: int, initial: int, progress: bool, description: str):
        truncate_log(csv_path, initial)
        self.steps = StepLog()
        self.csv = TrainingLog(csv_path, ["val_dice"] if with_val else [])
        self.board = tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None
        self.log_every = log_every
        self.bar = tqdm(total=total, initial=initial, disable=not progress, desc=description,
                        unit="it")

    def step(self, values: dict, skipped: bool, *, val_dice: float | None,
             stage_done: bool, other_val: dict[str, float] | None = None) -> None:
        self.steps.add(values, skipped)
        step = values["step"]
        if step % self.log_every == 0 or val_dice is not None or stage_done:
            row = self.steps.read()
            if val_dice is not None:
                row["val_dice"] = val_dice
                # other networks' validation (TrainedNetwork.validate): logged, never selected on
                row.update({f"val_dice_{name}": v for name, v in (other_val or {}).items()})
            self.csv.write(row)
            if self.board is not None:
                for key, value in row.items():
                    if key not in ("step", "stage"):
                        self.board.add_scalar(key, value, step)
            self.bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", stage=values["stage"],
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()
