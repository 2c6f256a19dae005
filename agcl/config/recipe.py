"""What one run trains with, resolved from the config alone (no data, no device, no files).

The Trainer builds its run from this, and the Snakefile hashes the same settings into the train
rule's params, so editing a recipe in the config reruns exactly the runs it changes, and a
checkpoint written under other settings is refused on resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agcl.config import (
    ConfigError,
    dataset_config,
    method_train_config,
    noise_twins,
    train_override_problems,
)
from agcl.config.checks import check_config
from agcl.data.loaders import default_augmentation
from agcl.data.specs import get_spec
from agcl.methods.hparams import ReadTrackedHparams
from agcl.methods.registry import resolve_method
from agcl.nets.inference import eval_window
from agcl.runtime.runfolder import settings_hash

# Training-config keys that change what is logged or saved, where the training set is held or
# whether CUDA may pick nondeterministic kernels, not the recipe a run trains with; they stay out
# of the settings hash, so changing them never blocks a resume or reruns a job.
EXECUTION_KEYS = ("log_every", "checkpoint_every", "tensorboard", "data_placement", "deterministic")
# Train keys added after runs existed, at the value that reproduces what ran before them: left out
# of the settings hash at that value, so adding the key neither reruns nor refuses those runs.
NEUTRAL_DEFAULTS = {"grad_reset": "none"}
NEUTRAL_HPARAM_DEFAULTS = {"consistency_start": 0}  # mean_teacher: no silent start


def positive_iterations(value: Any, where: str = "--iterations") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def _pop_train_overrides(base: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    """`--set train.lr=0.001` overrides the method's training recipe `base`; other keys are
    method hparams. The keys and values are checked against the config schema's train block,
    so a wrong key or value is named."""
    train = {k.split(".", 1)[1]: overrides.pop(k) for k in list(overrides) if k.startswith("train.")}
    problems = train_override_problems(train, base, "--set train") if train else []
    if problems:
        raise ConfigError("; ".join(problems))
    return train


@dataclasses.dataclass(frozen=True)
class Recipe:
    method_cls: type
    train_cfg: dict
    hparams: dict
    selection: str
    augmentation: dict
    stages: list
    settings: dict
    # "ulp": the noise-floor twin of a method (config noise_floor): its initial weights are moved
    # by one ulp, a change that is nothing in expectation; None for every ordinary run.
    init_perturbation: str | None = None
    noise_floor_of: str | None = None

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)


def resolve_recipe(config: dict, dataset: str, method: str, *,
                   overrides: dict[str, Any] | None = None,
                   iterations: int | None = None, ratio: float | str | None = None) -> Recipe:
    """The recipe of `method` on `dataset` under `config` (plus CLI overrides), checked.

    A noise-floor twin (`<method>_ulp`) is its method's recipe plus the one-ulp perturbation of
    the initial weights, which is part of its settings (so its hash differs from the method's).
    """
    twin_of = noise_twins(config).get(method)
    if twin_of is not None:
        base = resolve_recipe(config, dataset, twin_of, overrides=overrides, iterations=iterations,
                              ratio=ratio)
        return dataclasses.replace(base, settings={**base.settings, "init_perturbation": "ulp"},
                                   init_perturbation="ulp", noise_floor_of=twin_of)
    spec = get_spec(dataset)
    dcfg = dataset_config(config, dataset)
    overrides = dict(overrides or {})
    # The registry's checks for this one run: this method on this dataset, which it must support
    # (the DAG build checks the whole grid, skip_methods included).
    check_config({**config, "methods": [method],
                  "datasets": {dataset: {**config["datasets"][dataset], "skip_methods": []}}},
                 source="config")
    # A variant (e.g. an ablation) is its registered method with some hyperparameters changed:
    # the method's config hparams and training recipe apply, then the variant's own hparams.
    method_cls, variant_hparams = resolve_method(config, method)
    base_name = method_cls.name
    recipe = method_train_config(dcfg, method, base_name)
    train_cfg = {**recipe, **_pop_train_overrides(recipe, overrides)}
    if iterations is not None:
        train_cfg["iterations"] = positive_iterations(iterations)
    layers = hparam_layers(config, dataset, method, base_name, variant_hparams, overrides, ratio)
    # reads are tracked from here (stages, checks, the method): unread ones are reported
    hparams = ReadTrackedHparams(method_cls.hparams_for(dataset, *(layer for _, layer in layers)))
    augmentation = (default_augmentation(spec.spatial_dims)
                    if train_cfg["augmentation"] == "auto" else train_cfg["augmentation"])
    smoke = config.get("smoke_steps")
    if smoke:  # a smoke run: every stage at most this long (the main stage's recipe too)
        train_cfg["iterations"] = min(train_cfg["iterations"], smoke)
    stages = method_cls.stages(hparams, train_cfg)
    if smoke:
        stages = [dataclasses.replace(s, iterations=min(s.iterations, smoke)) for s in stages]
    for stage in stages:
        positive_iterations(stage.iterations, f"{method}: iterations of stage '{stage.name}'")
    problems = method_cls.check_recipe(hparams, train_cfg, spec)
    if problems:
        raise ConfigError(f"datasets.{dataset}: {method}: " + "; ".join(problems))
    eval_patch, eval_stride = eval_window(dcfg["eval"], train_cfg["patch"])
    # Everything that decides the weights a run ends with.
    settings = {
        "train": {k: v for k, v in sorted(train_cfg.items()) if k not in EXECUTION_KEYS
                  and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])},
        "hparams": {k: v for k, v in sorted(hparams.items())
                    if not (k in NEUTRAL_HPARAM_DEFAULTS and v == NEUTRAL_HPARAM_DEFAULTS[k])},
        "net": {"name": method_cls.net_name(spec), **dcfg["net"]},
        "selection": dcfg["selection"],
        "validation_window": {"patch": eval_patch, "stride": eval_stride},
        "augmentation": augmentation,
        "stages": [dataclasses.asdict(stage) for stage in stages],
    }
    return Recipe(method_cls, train_cfg, hparams, dcfg["selection"], augmentation, stages,
                  settings)


def ratio_key(block: dict, ratio: float | str | None) -> str | None:
    """The key of `block` (datasets.<d>.hparams_by_ratio) that names `ratio`, or None."""
    if ratio is None:
        return None
    return next((key for key in block if abs(float(key) - float(ratio)) < 1e-9), None)


def hparam_layers(config: dict, dataset: str, method: str, base: str, variant_hparams: dict,
                  overrides: dict[str, Any], ratio: float | str | None = None
                  ) -> list[tuple[str, dict]]:
    """(where, values) of each layer laid over a method's declared defaults, lowest precedence
    first: the config's hparams, the dataset's, the dataset's for this labeled fraction (where
    a ratio is given), a variant's own, then `--set`."""
    dcfg = dataset_config(config, dataset)
    by_ratio = dcfg.get("hparams_by_ratio", {})
    key = ratio_key(by_ratio, ratio)
    return [(f"hparams.{base}", config.get("hparams", {}).get(base, {})),
            (f"datasets.{dataset}.hparams.{base}", dcfg.get("hparams", {}).get(base, {})),
            (f"datasets.{dataset}.hparams_by_ratio.{key}.{base}",
             by_ratio.get(key, {}).get(base, {}) if key is not None else {}),
            (f"variants.{method}.hparams", variant_hparams),
            ("--set", overrides)]


def stage_plan(config: dict, dataset: str, method: str, recipe: Recipe, *,
               overrides: dict[str, Any] | None = None, iterations: int | None = None,
               ratio: float | str | None = None) -> list[tuple[str, int, str]]:
    """(stage, steps, where the number comes from) of each stage of a resolved recipe, so a run
    can say what it will do before it does it. A stage before the main one takes its length from
    the method's hyperparameter `<stage>_iterations` (BCP's pre-training: pretrain_iterations)."""
    twin_of = noise_twins(config).get(method)
    name = twin_of or method
    dcfg = dataset_config(config, dataset)
    base = recipe.method_cls.name
    variant_hparams = dict(config.get("variants", {}).get(name, {}).get("hparams", {}))
    layers = hparam_layers(config, dataset, name, base, variant_hparams, dict(overrides or {}),
                           ratio)
    smoke = config.get("smoke_steps")
    plan = []
    for index, stage in enumerate(recipe.stages):
        if smoke and stage.iterations == smoke:
            where = f"smoke_steps {smoke} (caps every stage)"
        elif index == len(recipe.stages) - 1:
            if iterations is not None:
                where = "--iterations"
            elif "iterations" in dcfg.get("train_by_method", {}).get(name, {}):
                where = f"datasets.{dataset}.train_by_method.{name}.iterations"
            elif "iterations" in dcfg.get("train_by_method", {}).get(base, {}):
                where = f"datasets.{dataset}.train_by_method.{base}.iterations"
            else:
                where = f"datasets.{dataset}.train.iterations"
        else:
            key = f"{stage.name}_iterations"
            dataset_default = (f"{base}'s default for {dataset}",
                               recipe.method_cls.defaults_for(dataset))
            where = next((f"{label}: {key}" for label, layer in [*reversed(layers),
                                                                  dataset_default]
                          if key in layer), f"{base}'s default {key}")
        plan.append((stage.name, stage.iterations, where))
    return plan


def describe_plan(plan: list[tuple[str, int, str]]) -> str:
    """One line: 'pretrain 10000 (from ...) + main 12 (from ...) = 10012 steps'."""
    parts = " + ".join(f"{name} {steps} ({where})" for name, steps, where in plan)
    return f"{parts} = {sum(steps for _, steps, _ in plan)} steps"
