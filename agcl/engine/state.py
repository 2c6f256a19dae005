"""The state of a run's training loop: what a resume checkpoint carries besides the weights,
optimiser, sampler and random streams."""

from __future__ import annotations

import dataclasses
import math
import uuid


@dataclasses.dataclass
class TrainingState:
    step: int = 0  # steps done, over all stages
    stage: int = 0  # index of the current stage
    best_val: float = -math.inf  # best validation Dice of the current stage
    best_step: int | None = None
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    train_seconds: float = 0.0  # wall time of all segments (resumes included)
    stage_start_seconds: float = 0.0
    resumed_at: list[int] = dataclasses.field(default_factory=list)
    skipped: int = 0
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    consecutive_skips: int = 0
    stages: list[dict] = dataclasses.field(default_factory=list)  # records of finished stages

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainingState:
        return cls(**saved)
