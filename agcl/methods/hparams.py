"""Hyperparameters, each declared once by the method that reads it: default, allowed values and
why (DomainBed's `_hparam`, USB's `get_argument`). Values are checked when a recipe is resolved,
so the DAG build and `agcl train` refuse a bad one before any step runs.

This module imports nothing heavy: the configuration layer checks hyperparameters with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class HparamError(KeyError):
    """An unknown, renamed or inert hyperparameter name."""

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class HparamValueError(HparamError, ValueError):
    """A declared hyperparameter given a value it does not allow."""


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default and what it allows.

    The type comes from the default (bool, int, float, str), or `kind` where the default is None
    or a choice; a float also takes an int. `choices` lists allowed values (alone: the only
    ones; with `kind`: allowed besides values of that kind, e.g. "auto" or a positive int);
    `low` / `high` bound numbers (inclusive); `nullable` allows None.
    """

    default: Any
    doc: str = ""
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    kind: type | None = None
    nullable: bool = False

    def __post_init__(self):
        problem = self.problem(self.default)
        if problem:
            raise ValueError(f"HParam default {self.default!r}: {problem}")

    @property
    def value_kind(self) -> type | None:
        if self.kind is not None:
            return self.kind
        if self.default is None or (self.choices and self.default in self.choices):
            return None
        return type(self.default)

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (None: allowed)."""
        if value is None and (self.nullable or self.default is None and self.kind is None):
            return None
        if self.choices is not None and value in self.choices and type(value) is not bool:
            return None
        kind = self.value_kind
        if kind is None:
            return f"expected one of {', '.join(map(str, self.choices))}, got {value!r}"
        accepted = (int, float) if kind is float else (kind,)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
            alternatives = f" or one of {', '.join(map(str, self.choices))}" if self.choices else ""
            return f"expected a {kind.__name__}{alternatives}, got {value!r}"
        if self.low is not None and value < self.low:
            return f"expected >= {self.low}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"expected <= {self.high}, got {value!r}"
        return None


def resolve_hparams(method: str, declared: dict[str, HParam], dataset_defaults: dict[str, Any],
                    renamed: dict[str, str], overrides: tuple[dict[str, Any], ...]
                    ) -> dict[str, Any]:
    """Declared defaults <- per-dataset defaults <- each override in order, every value checked.

    A name the method does not declare is refused, listing the ones it does; an old spelling
    (`renamed`) names its new one."""
    hparams = {name: hp.default for name, hp in declared.items()}
    hparams.update(dataset_defaults)
    for override in overrides:
        unknown = sorted(set(override) - set(declared))
        if unknown:
            moved = [f"{old} is now {renamed[old]}" for old in unknown if old in renamed]
            raise HparamError(
                f"method '{method}' has no hyperparameter {', '.join(unknown)}"
                + (f" ({'; '.join(moved)})" if moved else "")
                + f" (known: {', '.join(sorted(declared))})")
        hparams.update(override)
    problems = [f"{method} hparam {name}: {problem}" for name, value in hparams.items()
                if (problem := declared[name].problem(value))]
    if problems:
        raise HparamValueError("; ".join(problems))
    return hparams


class ReadTrackedHparams(dict):
    """A run's resolved hyperparameters that remember which names were read (`[]` or `.get`),
    so the engine can report, at the end of a run, the declared ones that nothing read: a value
    set for them changed the recipe's hash but not the training. Copies and `**` unpacking do
    not count as reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def unread(self) -> list[str]:
        return sorted(set(self) - self.read)
