"""What every method provides to the engine.

A method owns its networks (student, and a teacher where it has one) and turns one two-stream
batch into a loss (`train_step`). The engine owns backward, AMP, the optimiser, the schedule,
checkpoints and validation, so method files never call `.backward()` (USB's split).

Randomness: a method draws from named streams, `self.streams` (agcl.runtime.random_streams.RandomStreams
of the run's seed), so that two methods at one seed see the same batches, box masks and dropout
masks, and a draw of its own never shifts another method's:

    g = self.streams.torch("my_noise", x.device)      # a torch.Generator on x's device
    noise = torch.randn(x.shape, generator=g, device=x.device)
    start = int(self.streams.numpy("my_box").integers(0, 10))  # host draw, no device sync
    with self.streams.seeded("my_head"):               # init drawing from torch's global RNG
        self.head = nn.Linear(8, 8)

Pick a new purpose name for a draw only your method makes; reuse a base method's purpose (BCP's
"box_mask") for a draw that should match it. The engine checkpoints the streams (resume stays
exact) and re-seeds the global RNGs before every step from (seed, step), so dropout and anything
drawn without a stream is aligned per step. Built outside the engine (tests), a method's streams
follow torch.initial_seed().
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from agcl.data.specs import DatasetSpec, get_spec
from agcl.methods.hparams import HParam, HparamError, resolve_hparams
from agcl.nets import build
from agcl.runtime.random_streams import streams_for_new_method

__all__ = ["MAIN", "PRETRAIN", "SCHEDULE_KEYS", "AuxiliaryUpdate", "Batch", "HParam",
           "HparamError", "Method", "Stage", "TrainedNetwork", "require_unlabeled"]


@dataclass
class Batch:
    """Labeled part first, unlabeled after, as the references' two-stream sampler."""

    x_labeled: torch.Tensor  # (Bl, C, *spatial)
    y_labeled: torch.Tensor  # (Bl, *spatial), int64 class ids
    x_unlabeled: torch.Tensor | None  # (Bu, C, *spatial) or None when nothing is unlabeled
    # Method.extra_unlabeled_batches more unlabeled batches, each (Bu, C, *spatial), from a
    # stream of their own (e.g. UniMatch's CutMix source images)
    x_unlabeled_extra: list[torch.Tensor] = field(default_factory=list)


PRETRAIN, MAIN = "pretrain", "main"


def default_kinds(spec: DatasetSpec) -> list[str]:
    """The keys of Method.dataset_defaults that apply to a dataset, in order of precedence (last
    wins): its dimension, its label set, its name."""
    return [f"{spec.spatial_dims}d", *(["multiclass"] if spec.num_classes > 2 else []), spec.name]
SCHEDULE_KEYS = ("lr", "schedule", "step_size", "gamma")


@dataclass(frozen=True)
class Stage:
    """One training stage: its own iteration count and lr schedule, restarted at its start.

    The engine runs a method's stages in order (a run's iterations are their sum), passes each
    `train_step` the step counted from the start of the current stage, and checkpoints across
    the boundary. `schedule` holds what the engine's learning_rate() reads (SCHEDULE_KEYS).
    """

    name: str
    iterations: int
    schedule: dict[str, Any] = field(default_factory=dict)
    # False: the optimiser's momentum starts afresh at this stage (a new optimiser, as BCP's LA
    # code); True: carried over from the previous stage (BCP's ACDC code loads it).
    keep_optimizer_state: bool = False


@dataclass(frozen=True)
class AuxiliaryUpdate:
    """A second set of parameters with an optimiser of its own (SASSNet's discriminator, Adam
    beside the segmentation net's SGD). The engine builds the optimiser, and in every iteration,
    after the main update, calls `method.auxiliary_step(name, batch, step)`, back-propagates that
    loss and steps this optimiser, which updates these parameters only. Its lr is constant."""

    name: str
    parameters: tuple[nn.Parameter, ...]
    optimizer: str  # "adam" or "sgd"
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    momentum: float = 0.0  # sgd
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainedNetwork:
    """A network the main update trains on train_step's loss (the student; CPS's two peers;
    projection heads). Every parameter of `module` goes to the engine's SGD; a network with its
    own settings gets a parameter group of its own: its lr is the stage's scheduled lr times
    `lr_scale` (so it follows the schedule and the stages), and `momentum` / `weight_decay`
    replace train.momentum / train.weight_decay when set. The engine checks, after the first
    backward of each stage, that every parameter that received a gradient belongs to an
    optimiser, and in the last stage that every declared network received one."""

    name: str
    module: nn.Module
    lr_scale: float = 1.0
    momentum: float | None = None
    weight_decay: float | None = None
    # Also validated at every validation (train_log.csv column val_dice_<name>), for watching a
    # peer; checkpoint selection stays on inference_net(). Needs a segmentation net's forward.
    validate: bool = False
    # The name of another trained network whose optimiser state (SGD momentum) this one takes
    # when a stage that keeps the optimiser's state starts (Stage.keep_optimizer_state): ABD's
    # second net loads the pre-training's optimiser as its first does (load_net_opt on both).
    # The method copies the weights themselves in start_stage; None: its own state.
    optimizer_state_from: str | None = None

    @property
    def own_settings(self) -> bool:
        return self.lr_scale != 1.0 or self.momentum is not None or self.weight_decay is not None


class Method(nn.Module):
    name: ClassVar[str] = "?"  # set by @register_method
    # True: the engine also draws unlabeled images into each batch.
    uses_unlabeled: ClassVar[bool] = True
    # How many more unlabeled batches each step gets in batch.x_unlabeled_extra.
    extra_unlabeled_batches: ClassVar[int] = 0
    # Every hyperparameter the method reads, declared once (agcl.methods.hparams.HParam), then
    # the per-dataset defaults where the references differ. Nothing is inherited from Method:
    # a name the method does not read is refused, not accepted and ignored.
    hyperparameters: ClassVar[dict[str, HParam]] = {}
    # Defaults by what differs between datasets, applied in this order over the declared ones:
    # the training dimension ("2d" / "3d": which reference script family), the label set
    # ("multiclass": more than one foreground class), then a dataset's own name where it must
    # differ from those. A new dataset gets its kind's defaults without a method edit.
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # Old spellings of renamed hyperparameters: refused with a message naming the new one.
    renamed_hparams: ClassVar[dict[str, str]] = {}

    @classmethod
    def hparams_for(cls, dataset: str, *overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults <- per-dataset defaults <- each override in order; an unknown name or a
        value the declaration does not allow is an error (HparamError / HparamValueError)."""
        return resolve_hparams(cls.name, cls.hyperparameters, cls.defaults_for(dataset),
                               cls.renamed_hparams, overrides)

    @classmethod
    def defaults_for(cls, dataset: str) -> dict[str, Any]:
        """dataset_defaults for `dataset`: its dimension's, its label set's, then its own."""
        return {key: value for kind in default_kinds(get_spec(dataset))
                for key, value in cls.dataset_defaults.get(kind, {}).items()}

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str | None:
        """Why this method cannot train on `spec`'s dataset (e.g. a 3D-only reference on a 2D
        dataset), or None. A config that lists the method must then name it in
        `datasets.<d>.skip_methods`, so that the grid says what it leaves out."""
        return None

    @classmethod
    def net_name(cls, spec: DatasetSpec) -> str:
        return spec.default_net

    @classmethod
    def stages(cls, hparams: dict[str, Any], train_cfg: dict[str, Any]) -> list[Stage]:
        """The stages a run of this method trains, in order; the last is the main stage, whose
        length is the dataset's train.iterations. Methods with a pre-training stage (BCP) prepend
        it here."""
        return [Stage(MAIN, train_cfg["iterations"], {k: train_cfg[k] for k in SCHEDULE_KEYS})]

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], train_cfg: dict[str, Any],
                     spec: DatasetSpec) -> list[str]:
        """What makes this resolved recipe unable to train as the method means it (e.g. Semi-AGCL's
        patch geometry on a small crop), one message per problem naming the key, the numbers and
        the fix; [] when fine (the default: no check). resolve_recipe calls it, so `agcl train`
        and the Snakefile's DAG build refuse such a config before any job runs."""
        return []

    def start_stage(self, name: str, fresh: bool) -> None:
        """Called by the engine before the first step of every stage, and again after a resume
        (fresh=False: the weights come from the checkpoint, only the mode is set)."""
        self.stage = name

    def __init__(self, spec: DatasetSpec, hparams: dict[str, Any], net_kwargs: dict[str, Any],
                 total_iterations: int):
        super().__init__()
        self.streams = streams_for_new_method()  # see the module docstring
        self.spec = spec
        self.hparams = hparams
        self.total_iterations = total_iterations
        self.student = build(self.net_name(spec), spec.in_channels, spec.num_classes, **net_kwargs)
        self.stage = MAIN

    def train_step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one batch and the terms to log: name -> 0-d tensor or float. Return
        tensors (detached) rather than `float(t)`: the engine sums them on the device and reads
        them once per log row, while a float() here would stall the GPU every step."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimiser step (EMA teachers update here)."""

    def auxiliary_updates(self) -> list[AuxiliaryUpdate]:
        """Parameters outside trainable_parameters() that an optimiser of their own updates on
        their own loss each iteration (default: none). They must not receive gradients from
        train_step's loss (the engine's main update would leave those behind)."""
        return []

    def auxiliary_step(self, name: str, batch: Batch,
                       step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of auxiliary update `name` on the iteration's batch, after the main update
        (so it sees the updated networks), and its terms to log; as train_step."""
        raise NotImplementedError(f"{type(self).__name__} declares auxiliary update {name!r} "
                                  "but no auxiliary_step")

    def inference_net(self) -> nn.Module:
        """The network evaluated at validation and test time (the student, as the references).
        Checkpoint selection (best_val) and the test metrics read this one net."""
        return self.student

    def trained_networks(self) -> list[TrainedNetwork]:
        """The networks the main update trains, in optimiser order (default: the student). A
        method with peers (CPS) or heads lists each here; teachers updated by EMA are not
        listed (they receive no gradient)."""
        return [TrainedNetwork("student", self.student)]

    def trainable_parameters(self):
        """Every parameter of trained_networks(), in their order (what the main SGD updates)."""
        return itertools.chain.from_iterable(n.module.parameters()
                                             for n in self.trained_networks())


def require_unlabeled(batch: Batch, method: str) -> torch.Tensor:
    if batch.x_unlabeled is None or batch.x_unlabeled.shape[0] == 0:
        raise ValueError(f"method '{method}' needs unlabeled images: batch.x_unlabeled is empty "
                         "(expected batch_size > labeled_batch_size)")
    return batch.x_unlabeled
