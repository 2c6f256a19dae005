"""Checkpoints that make a resumed run end with the same weights as an uninterrupted one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from agcl.utils import atomic_path


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: str | Path, payload: dict) -> None:
    """Write to a temp name and rename, so a crash never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: str | Path, map_location="cpu") -> dict:
    # Our own files: they hold numpy RNG states and plain dicts, which weights_only rejects.
    return torch.load(path, map_location=map_location, weights_only=False)
