"""Time one training step of every registered method on the same synthetic batch.

A step is what the engine does per iteration, through the engine's own Updater: method.train_step
+ backward + SGD step (lr 0.01, momentum 0.9, wd 1e-4) + method.after_optimizer_step, then each
auxiliary update the method declares (SASSNet's discriminator) with its own optimiser. Every method gets the same random batch
(images N(0, 1), labels uniform class ids) and the same seed for its weights; methods that do not
use unlabeled images get none, as in the engine. Median seconds over --repeats after --warmup.
The methods take turns, one step each per round, so that a change in machine load (a shared CPU)
hits them all alike.

Prints CSV on stdout: a comment line with shapes/device, then
method,step_seconds,ratio_to_supervised, then the step-cost goals as ratios. Two supervised rows:
`supervised` as the engine trains it (the labeled part of the batch only) and
`supervised_whole_batch` (every image of the batch labeled: one student pass over as many images
as a semi-supervised step sees, the denominator of "what the extra machinery costs").

Defaults depend on the device. CPU: reduced width 4 and patch 64x64x48 (LA) / 128x128 (ACDC),
batch 4 with 2 labeled, about a minute on 2 cores. CUDA: the full size of the training recipe,
width 16, LA 112x112x80 batch 8 (4 labeled), ACDC 256x256 batch 24 (12 labeled).

    python benchmarks/step_time.py --dataset la --repeats 5
    python benchmarks/step_time.py --dataset acdc --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from agcl.data.specs import get_spec
from agcl.engine.optimizers import auxiliary_optimizers, main_optimizer
from agcl.engine.state import TrainingState
from agcl.engine.update import Updater
from agcl.methods.base import Batch
from agcl.methods.registry import get_method, list_methods
from agcl.runtime.devices import channels_last_format

WIDTH_KWARG = {"la": "n_filters", "acdc": "base_features"}
ITERATIONS = {"la": 15000, "acdc": 30000}
# device type -> dataset -> (width, patch, batch, labeled batch)
DEFAULTS = {
    "cpu": {"la": (4, (64, 64, 48), 4, 2), "acdc": (4, (128, 128), 4, 2)},
    "cuda": {"la": (16, (112, 112, 80), 8, 4), "acdc": (16, (256, 256), 24, 12)},
}
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
SCHEDULE = {"lr": 0.01, "schedule": "constant"}
ITERATIONS_ANY = 1  # the stage length a constant schedule never reads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(WIDTH_KWARG), default="la")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--width", type=int, help="n_filters / base_features (default: by device)")
    parser.add_argument("--patch", type=int, nargs="+", help="spatial size (default: by device)")
    parser.add_argument("--batch", type=int, help="images per step (default: by device)")
    parser.add_argument("--labeled-batch", type=int, help="labeled images of those")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--amp", choices=sorted(AMP), default="off", help="autocast dtype")
    parser.add_argument("--methods", nargs="+", help="subset of the registry (default: all)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="weights and batches in channels-last order, as train.channels_last")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"][args.dataset]
    width, patch, batch, labeled = defaults
    args.width = args.width or width
    args.patch = tuple(args.patch or patch)
    args.batch = args.batch or batch
    args.labeled_batch = args.labeled_batch or labeled
    spatial_dims = get_spec(args.dataset).spatial_dims
    if len(args.patch) != spatial_dims:
        parser.error(f"--patch: {args.dataset} needs {spatial_dims} sizes, got {args.patch}")
    if not 0 < args.labeled_batch <= args.batch:
        parser.error(f"--labeled-batch: expected 1..{args.batch}, got {args.labeled_batch}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    args.device = device
    return args


def synthetic_batch(args, num_classes: int, in_channels: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    n_unlabeled = args.batch - args.labeled_batch
    x_l = torch.randn(args.labeled_batch, in_channels, *args.patch, generator=generator)
    y_l = torch.randint(0, num_classes, (args.labeled_batch, *args.patch), generator=generator)
    x_u = torch.randn(n_unlabeled, in_channels, *args.patch, generator=generator)
    layout = channels_last_format(x_l.ndim) if args.channels_last else torch.contiguous_format
    x_l, x_u = (x.to(args.device).contiguous(memory_format=layout) for x in (x_l, x_u))
    return Batch(x_l, y_l.to(args.device), x_u if n_unlabeled else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WHOLE_BATCH = "supervised_whole_batch"
# The one goal: what the AGCL terms add to their base's step (issue 16 retired the ratios to
# supervised, set for a mean-teacher base; they are printed for information).
GOALS = (("semi_agcl", "bcp", 1.10), ("semi_agcl", "supervised", None),
         ("semi_agcl", WHOLE_BATCH, None), ("bcp", WHOLE_BATCH, None))


def whole_batch(batch: Batch, num_classes: int, generator: torch.Generator) -> Batch:
    """The same images, all labeled (random labels for the unlabeled part)."""
    if batch.x_unlabeled is None:
        return batch
    y_u = torch.randint(0, num_classes, (batch.x_unlabeled.shape[0], *batch.x_unlabeled.shape[2:]),
                        generator=generator).to(batch.y_labeled.device)
    return Batch(torch.cat([batch.x_labeled, batch.x_unlabeled]),
                 torch.cat([batch.y_labeled, y_u]), None)


class Runner:
    """One method, its optimiser and its batch: `step()` runs and times one engine iteration."""

    def __init__(self, name: str, args, batch: Batch):
        if name == WHOLE_BATCH:
            name = "supervised"
            batch = whole_batch(batch, get_spec(args.dataset).num_classes,
                                torch.Generator().manual_seed(1))
        spec = get_spec(args.dataset)
        cls = get_method(name)
        torch.manual_seed(0)
        self.method = cls(spec, cls.hparams_for(args.dataset),
                          {WIDTH_KWARG[args.dataset]: args.width},
                          ITERATIONS[args.dataset]).to(args.device)
        if args.channels_last:
            self.method.to(memory_format=channels_last_format(2 + len(args.patch)))
        self.method.train()
        amp = AMP[args.amp]
        scaler = torch.amp.GradScaler(args.device.type, enabled=amp == torch.float16)
        self.update = Updater(self.method, main_optimizer(self.method, SGD), scaler,
                              device=args.device, amp_dtype=amp, nonfinite="stop",
                              max_consecutive_skips=1, where=f"step_time {name}",
                              auxiliary=auxiliary_optimizers(self.method))
        self.state = TrainingState()
        self.batch = batch if cls.uses_unlabeled else Batch(batch.x_labeled, batch.y_labeled, None)
        self.device = args.device
        self.iteration = 0

    def step(self) -> float:
        sync(self.device)
        tic = time.perf_counter()
        self.update(self.method, self.batch, SCHEDULE, self.iteration, ITERATIONS_ANY,
                    self.state)
        sync(self.device)
        self.iteration += 1
        return time.perf_counter() - tic


def time_methods(names: list[str], args, batch: Batch) -> dict[str, float]:
    runners = {name: Runner(name, args, batch) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.warmup + args.repeats):
        for name, runner in runners.items():
            elapsed = runner.step()
            if round_index >= args.warmup:
                seconds[name].append(elapsed)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.methods or list_methods()
    unknown = sorted(set(names) - set(list_methods()))
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(list_methods())}",
              file=sys.stderr)
        return 2
    if "supervised" not in names:
        names = ["supervised", *names]  # the ratio's denominator
    spec = get_spec(args.dataset)
    skipped = {n: get_method(n).unsupported(spec) for n in names if get_method(n).unsupported(spec)}
    for name, reason in skipped.items():
        print(f"# {name} skipped: {reason}")
    names = [n for n in names if n not in skipped] + [WHOLE_BATCH]
    batch = synthetic_batch(args, spec.num_classes, spec.in_channels)
    timings = time_methods(names, args, batch)
    print(f"# dataset={args.dataset} device={args.device} amp={args.amp} width={args.width} "
          f"patch={'x'.join(map(str, args.patch))} batch={args.batch} "
          f"labeled={args.labeled_batch} repeats={args.repeats} warmup={args.warmup} "
          f"channels_last={args.channels_last} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print("method,step_seconds,ratio_to_supervised")
    for name, seconds in timings.items():
        print(f"{name},{seconds:.4f},{seconds / timings['supervised']:.2f}")
    for numerator, denominator, goal in GOALS:
        if numerator in timings and denominator in timings:
            ratio = timings[numerator] / timings[denominator]
            verdict = "" if goal is None else f" (goal <= {goal:.2f}: " \
                f"{'met' if ratio <= goal else 'NOT met'})"
            print(f"# {numerator} / {denominator} = {ratio:.2f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
