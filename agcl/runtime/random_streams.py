"""Named random streams: common random numbers across methods.

A paired comparison of two methods at one seed carries only the noise it has to when both see
the same batches, box masks and dropout masks. So every purpose draws from its own stream, seeded
from (run seed, purpose) alone: what one method draws for a purpose of its own (Semi-AGCL's
strong view, UA-MT's uncertainty passes) never shifts what another purpose yields.

Seeds come from numpy's SeedSequence, stable across Python processes and platforms (no hash()).
Streams in use:
- the sampler (agcl.data.loaders): "labeled_batches", "unlabeled_batches" (numpy, host);
- BCP and methods built on it: "box_mask" (numpy, host: a box start needs no device sync);
- Mean Teacher / UA-MT: "teacher_noise"; UA-MT also "uncertainty_noise";
- Semi-AGCL: "strong_view", "hard_negatives", "mix_coefficients", and "projection_head" for the
  head and queue initialisation (a one-off `seeded` block);
- the global RNGs (torch, numpy, random: dropout, anything drawn without a stream) are re-seeded
  before every training step from (seed, "step", step) by `seed_globals`.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from collections.abc import Iterator

import numpy as np
import torch

STEP = "step"  # the purpose of the per-step global seeds


def seed_sequence(seed: int, purpose: str, *index: int) -> np.random.SeedSequence:
    """The SeedSequence of one purpose (and optional indices, e.g. a step) of a run's seed.

    The purpose enters the spawn key as its UTF-8 bytes behind their count, so no two distinct
    (purpose, index) pairs share a key."""
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"random stream purpose: expected a non-empty string, got {purpose!r}")
    if int(seed) < 0 or any(int(i) < 0 or int(i) >= 2**32 for i in index):
        raise ValueError(f"random stream {purpose!r}: expected a seed >= 0 and indices in "
                         f"[0, 2**32), got seed {seed} and indices {index}")
    code = purpose.encode("utf-8")
    return np.random.SeedSequence(int(seed), spawn_key=(len(code), *code, *map(int, index)))


def stream_seed(seed: int, purpose: str, *index: int) -> int:
    """A 64-bit integer seed for (seed, purpose, *index), e.g. for torch.Generator.manual_seed."""
    return int(seed_sequence(seed, purpose, *index).generate_state(1, np.uint64)[0])


def numpy_stream(seed: int, purpose: str, *index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, *index)))


def torch_stream(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` (a CUDA draw needs a generator on that device)."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, purpose))


def seed_globals(seed: int, step: int) -> None:
    """Re-seed the global RNGs (python, numpy, torch on every device) from (seed, "step", step),
    so that a method drawing more or less elsewhere does not shift another's dropout masks."""
    state = seed_sequence(seed, STEP, step).generate_state(2, np.uint64)
    random.seed(int(state[0]))
    np.random.seed(int(state[0] % 2**32))
    # torch.manual_seed would also queue seeds for every backend compiled in (~0.2 ms a step on
    # a CPU-only run); seed the CPU generator, and CUDA's once CUDA is in use.
    torch.default_generator.manual_seed(int(state[1]))
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(int(state[1]))


class RandomStreams:
    """The streams of one run, created on first use and checkpointed with it.

    `numpy(purpose)` is a numpy Generator (host draws), `torch(purpose, device)` a torch.Generator
    living on `device`; each purpose is one stream on one device. `seeded(purpose)` runs a block
    with torch's global CPU RNG seeded for that purpose and restores it after (for code that only
    draws from the global RNG, such as nn.Module initialisation).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._numpy: dict[str, np.random.Generator] = {}
        self._torch: dict[str, torch.Generator] = {}
        self._pending: dict[str, dict] = {"numpy": {}, "torch": {}}  # loaded, not yet created

    def numpy(self, purpose: str) -> np.random.Generator:
        if purpose not in self._numpy:
            rng = numpy_stream(self.seed, purpose)
            if purpose in self._pending["numpy"]:
                rng.bit_generator.state = self._pending["numpy"].pop(purpose)
            self._numpy[purpose] = rng
        return self._numpy[purpose]

    def torch(self, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        generator = self._torch.get(purpose)
        if generator is None:
            generator = torch_stream(self.seed, purpose, device)
            if purpose in self._pending["torch"]:
                generator.set_state(self._pending["torch"].pop(purpose).cpu())
            self._torch[purpose] = generator
        elif generator.device != device:
            raise ValueError(f"random stream {purpose!r} lives on {generator.device}, asked for "
                             f"on {device}: expected one device per purpose")
        return generator

    @contextlib.contextmanager
    def seeded(self, purpose: str) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, purpose))
            yield

    def state_dict(self) -> dict:
        numpy_states = {**self._pending["numpy"],
                        **{k: g.bit_generator.state for k, g in self._numpy.items()}}
        torch_states = {**self._pending["torch"],
                        **{k: g.get_state() for k, g in self._torch.items()}}
        return {"seed": self.seed, "numpy": numpy_states, "torch": torch_states}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"random streams of seed {state['seed']}: expected seed {self.seed}")
        # Streams not created yet take their state when first used (a torch one on its device).
        self._pending = {"numpy": dict(state["numpy"]), "torch": dict(state["torch"])}
        for purpose in list(self._numpy):
            if purpose in self._pending["numpy"]:
                self._numpy[purpose].bit_generator.state = self._pending["numpy"].pop(purpose)
            else:
                self._numpy[purpose] = numpy_stream(self.seed, purpose)
        for purpose, generator in list(self._torch.items()):
            if purpose in self._pending["torch"]:
                generator.set_state(self._pending["torch"].pop(purpose).cpu())
            else:
                self._torch[purpose] = torch_stream(self.seed, purpose, generator.device)


_BUILDING: contextvars.ContextVar[RandomStreams | None] = contextvars.ContextVar(
    "agcl_building_streams", default=None)


@contextlib.contextmanager
def building(streams: RandomStreams) -> Iterator[RandomStreams]:
    """The engine builds a method inside this block, which hands the method the run's streams."""
    token = _BUILDING.set(streams)
    try:
        yield streams
    finally:
        _BUILDING.reset(token)


def streams_for_new_method() -> RandomStreams:
    """The run's streams inside `building`; elsewhere (tests, notebooks) streams of
    torch.initial_seed(), so torch.manual_seed(s) before building a method makes it repeatable."""
    return _BUILDING.get() or RandomStreams(torch.initial_seed())
