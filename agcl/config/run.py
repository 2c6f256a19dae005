"""One run's description, typed and frozen: what it trains (dataset, method, ratio, seed, the
resolved recipe), on what (split, processed data, their identity hash) and how (device,
precision, determinism). The Trainer builds it once, the engine's parts (prepare, checkpoint
payloads, run.json) read it, and run.json records it (`RunDescription.record`)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import torch

from agcl.common.utils import ratio_tag
from agcl.config.load import ConfigError, Layout, dataset_config
from agcl.config.recipe import Recipe, resolve_recipe
from agcl.data.loaders import read_split
from agcl.data.preprocess import load_index
from agcl.data.specs import DatasetSpec, get_spec
from agcl.nets.inference import eval_window
from agcl.runtime.devices import amp_name, resolve_amp, resolve_deterministic, resolve_device
from agcl.runtime.runfolder import run_identity


@dataclasses.dataclass(frozen=True)
class RunDescription:
    dataset: str
    method: str  # as the grid names it: a registered method, or a variant of one
    ratio: float
    seed: int
    spec: DatasetSpec
    recipe: Recipe
    net: dict  # datasets.<d>.net: the net's options
    validation_window: tuple[list[int], list[int]]  # (patch, stride) of validation
    window_batch: int
    split_path: Path
    processed: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    deterministic: bool
    identity: dict  # dataset, method, ratio, seed, settings and data hashes (resume checks it)
    config: dict  # the whole config, recorded with the run

    # --- what the recipe decides, by name ------------------------------------------------------
    @property
    def method_cls(self) -> type:
        return self.recipe.method_cls

    @property
    def train_cfg(self) -> dict:
        return self.recipe.train_cfg

    @property
    def hparams(self) -> dict:
        return self.recipe.hparams

    @property
    def stages(self) -> list:
        return self.recipe.stages

    @property
    def stage_starts(self) -> list[int]:
        """The first step of every stage, and the run's total last."""
        return list(itertools.accumulate([0] + [s.iterations for s in self.stages]))

    @property
    def total(self) -> int:
        return self.stage_starts[-1]

    @property
    def ratio_tag(self) -> str:
        return ratio_tag(self.ratio)

    @property
    def net_name(self) -> str:
        return self.method_cls.net_name(self.spec)

    @property
    def name(self) -> str:
        """How logs and errors name the run."""
        return f"{self.dataset}/{self.method_cls.name} r{self.ratio_tag} s{self.seed}"

    def record(self) -> dict[str, Any]:
        """What run.json keeps of the description (JSON: no classes, no tensors)."""
        patch, stride = self.validation_window
        return {"dataset": self.dataset, "method": self.method, "base_method": self.method_cls.name,
                "ratio": self.ratio, "seed": self.seed, "net": {"name": self.net_name, **self.net},
                "validation_window": {"patch": patch, "stride": stride,
                                      "window_batch": self.window_batch},
                "split": str(self.split_path), "processed": str(self.processed),
                "device": str(self.device), "amp": amp_name(self.amp_dtype),
                "deterministic": self.deterministic, "settings_hash": self.recipe.settings_hash,
                "data_hash": self.identity.get("data_hash")}


def describe_run(config: dict, dataset: str, method: str, ratio: float, seed: int, *,
                 iterations: int | None = None, device: str | None = None,
                 overrides: dict[str, Any] | None = None, root: str | Path = ".") -> RunDescription:
    """Resolve and check everything one run needs before any file is touched: the recipe, the
    split (it must hold this ratio, and val cases under best_val), the device."""
    spec = get_spec(dataset)
    dcfg = dataset_config(config, dataset)
    recipe = resolve_recipe(config, dataset, method, overrides=overrides, iterations=iterations,
                            ratio=ratio)
    layout = Layout(config, root)
    split_path = layout.splits(dataset, seed)
    split = read_split(split_path)
    tag = ratio_tag(ratio)
    if tag not in split["labeled"]:
        raise ConfigError(f"{split_path} has no labeled subset for ratio {tag} "
                          f"(has {', '.join(split['labeled'])}): add it to the config's ratios "
                          "and rerun `agcl splits`")
    if recipe.selection == "best_val" and not split["val"]:
        raise ConfigError(f"datasets.{dataset}.selection is best_val but {split_path} has "
                          f"no val cases (set datasets.{dataset}.val_cases > 0)")
    torch_device = resolve_device(device or config.get("device", "auto"))
    processed = layout.processed(dataset)
    return RunDescription(
        dataset=dataset, method=method, ratio=float(ratio), seed=seed, spec=spec, recipe=recipe,
        net=dict(dcfg["net"]),
        validation_window=eval_window(dcfg["eval"], recipe.train_cfg["patch"]),
        window_batch=dcfg["eval"]["window_batch"], split_path=split_path, processed=processed,
        device=torch_device, amp_dtype=resolve_amp(recipe.train_cfg["amp"], torch_device),
        deterministic=resolve_deterministic(recipe.train_cfg["deterministic"], torch_device),
        identity=run_identity(dataset, method, float(ratio), seed, recipe.settings,
                              data={"split": split, "index": load_index(processed)}),
        config=config)
