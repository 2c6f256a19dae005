"""The parts of a run, built in a fixed order (the order fixes every random draw): data, the
method under its random streams, the sampler, the optimiser and the gradient scaler."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from agcl.data.loaders import (
    PatchSampler,
    TrainingSet,
    load_cases,
    load_training_set,
    read_split,
    training_set_bytes,
)
from agcl.engine.method_errors import method_code
from agcl.engine.optimizers import auxiliary_optimizers, main_optimizer
from agcl.runtime.devices import channels_last_format, data_device, seed_everything
from agcl.runtime.random_streams import RandomStreams, building


@dataclasses.dataclass
class PreparedRun:
    split: dict
    data: TrainingSet
    val_cases: list
    method: Any  # an agcl.methods.base.Method on the training device
    streams: RandomStreams
    sampler: PatchSampler
    optimizer: torch.optim.Optimizer
    # name -> (AuxiliaryUpdate, its optimiser): parameters the main SGD does not update
    auxiliary: dict[str, tuple[Any, torch.optim.Optimizer]]
    scaler: torch.amp.GradScaler
    data_device: torch.device | None  # where the sampler holds the training set (None: host)


def prepare(run) -> PreparedRun:
    """Build a run's parts from a Trainer's resolved recipe (nothing is written)."""
    train_cfg = run.train_cfg
    seed_everything(run.seed, run.device, run.deterministic)
    split = read_split(run.split_path)
    processed = run.processed
    data = load_training_set(processed, split, run.ratio_tag, train_cfg["patch"])
    val_cases = load_cases(processed, split["val"]) if split["val"] else []
    # The method's named random streams (agcl.runtime.random_streams), checkpointed with the run.
    streams = RandomStreams(run.seed)
    with building(streams), method_code(run.method_cls, run.name, "__init__"):
        method = run.method_cls(run.spec, run.hparams, run.net,
                                    run.stages[-1].iterations).to(run.device)
    if run.recipe.init_perturbation == "ulp":  # deterministic: draws no random number
        perturb_one_ulp(method)
    if train_cfg["channels_last"]:
        # Applies to the conv weights of the spatial rank (4-D for 2D nets, 5-D for 3D ones).
        method.to(memory_format=channels_last_format(2 + len(train_cfg["patch"])))
    labeled_bs = train_cfg["labeled_batch_size"]
    unlabeled_bs = train_cfg["batch_size"] - labeled_bs if method.uses_unlabeled else 0
    on_device = data_device(train_cfg["data_placement"], run.device,
                            training_set_bytes(data, unlabeled=unlabeled_bs > 0))
    return PreparedRun(
        split=split, data=data, val_cases=val_cases, method=method, streams=streams,
        sampler=PatchSampler(data, train_cfg["patch"], labeled_bs, unlabeled_bs, run.seed,
                             run.recipe.augmentation, device=on_device,
                             extra_unlabeled=method.extra_unlabeled_batches),
        optimizer=main_optimizer(method, train_cfg),
        auxiliary=auxiliary_optimizers(method),
        scaler=torch.amp.GradScaler(run.device.type,
                                    enabled=run.amp_dtype == torch.float16),
        data_device=on_device,
    )


@torch.no_grad()
def perturb_one_ulp(module: torch.nn.Module) -> None:
    """Move every floating-point parameter (student, teacher, heads) one ulp towards +inf: the
    run-to-run twins' perturbation, nothing in expectation, yet enough for a small run to diverge
    chaotically from its unperturbed twin."""
    for p in module.parameters():
        if p.is_floating_point():
            p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
