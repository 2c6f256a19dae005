"""Load an experiment config and validate it against the package's schema
(agcl/schemas/config.schema.yaml, shipped with the package), then by the rules across keys that a
schema cannot say (config_rules).

The Snakefile validates the same schema file with Snakemake's own `validate()` and then applies
config_rules; the CLI does both here (validate_config), so that every `agcl` subcommand run by
hand gets the same defaults and the same checks.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from agcl.common.utils import ratio_tag

# Package data (pyproject package-data), so an installed agcl validates without a checkout.
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is missing or of the wrong kind; the message names the file and the key."""


def _validator_filling_defaults():
    base = jsonschema.Draft202012Validator

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The schema, read once per process (callers never modify it)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate_config(config: dict, source: str = "<config>") -> dict:
    """Fill defaults in place and raise ConfigError naming the first offending key: the schema,
    then config_rules."""
    validator = _validator_filling_defaults()(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"invalid value at '{'.'.join(map(str, e.absolute_path)) or '<top level>'}': "
                 f"{e.message}" for e in errors]
        raise ConfigError(f"{source}: " + "; ".join(lines))
    return config_rules(config, source)


def config_rules(config: dict, source: str = "<config>") -> dict:
    """The checks across keys that the schema cannot express, on a config the schema has
    validated (and filled with its defaults): applies run_datasets and resolves roles in place,
    raises ConfigError naming the key."""
    if config["run_datasets"]:
        # The grid on some datasets only: everything downstream sees just those.
        missing = [d for d in config["run_datasets"] if d not in config["datasets"]]
        if missing:
            raise ConfigError(f"{source}: run_datasets names {missing}, which datasets does not "
                              f"configure (configured: {', '.join(config['datasets'])})")
        config["datasets"] = {d: config["datasets"][d] for d in config["run_datasets"]}
    problems = [f"noise_floor.methods: '{m}' is not in methods ({', '.join(config['methods'])}); "
                "a run-to-run twin retrains a method of the grid"
                for m in config["noise_floor"].get("methods", []) if m not in config["methods"]]
    taken = set(config["methods"]) | set(config["variants"])
    problems += [f"noise_floor: the twin name '{t}' is already a method or variant name"
                 for t in sorted(set(noise_twins(config)) & taken)]
    resolved, role_problems = _resolve_roles(config.setdefault("roles", {}), config["methods"])
    problems += role_problems or _full_supervision_problems(config, resolved)
    if not role_problems:
        config["roles"].update(resolved)  # the names every later reader gets (roles_of)
    for dataset, dcfg in config["datasets"].items():
        problems += _eval_window_problems(dcfg, f"datasets.{dataset}")
        problems += _batch_problems(dcfg["train"], f"datasets.{dataset}.train")
        # Per-method recipes (the reference protocol) are checked like the train block itself.
        for method, override in dcfg.get("train_by_method", {}).items():
            problems += train_override_problems(override, dcfg["train"],
                                                f"datasets.{dataset}.train_by_method.{method}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


ROLES = ("lower_bound", "method_of_interest")


def default_roles() -> dict[str, str]:
    """{role: method} of the schema's defaults (config `roles`)."""
    properties = load_schema()["properties"]["roles"]["properties"]
    return {role: properties[role]["default"] for role in ROLES}


def _resolve_roles(given: dict, methods: list[str]) -> tuple[dict, list[str]]:
    """({role: method or None}, problems) of a config's `roles` (see the schema): a role named in
    the config must be one of `methods`; a default absent from them means no lower bound, or
    the first of `methods` as the method of interest."""
    defaults = default_roles()
    resolved, problems = {}, []
    for role in ROLES:
        name = given.get(role, defaults[role])
        if name is None or name in methods:
            resolved[role] = name
        elif name == defaults[role]:
            resolved[role] = None if role == "lower_bound" else methods[0]
        else:
            resolved[role] = name
            problems.append(f"roles.{role}: '{name}' is not in methods ({', '.join(methods)}); "
                            "a role names a method of the grid")
    return resolved, problems


def _full_supervision_problems(config: dict, resolved: dict) -> list[str]:
    if not config["full_supervision"] or resolved["lower_bound"] is not None:
        return []
    given = config["roles"].get("lower_bound", default_roles()["lower_bound"])
    why = ("roles.lower_bound is null" if given is None
           else f"its default '{given}' is not in methods")
    return [(f"full_supervision: true trains the lower bound on 100 % labels, but the grid has "
             f"none ({why}); name one of methods ({', '.join(config['methods'])}) in "
             "roles.lower_bound, or set full_supervision: false")]


def roles_of(config: dict) -> dict[str, str | None]:
    """{role: method} of a grid: `lower_bound` a method of `methods` or None (the grid has no
    lower bound), `method_of_interest` a method of `methods` (config `roles`, resolved as
    validation writes them back)."""
    return _resolve_roles(config.get("roles") or {}, config["methods"])[0]


def comparison_references(config: dict | None = None) -> tuple[str, ...]:
    """The references of the report's paired comparisons: the method of interest, then the
    lower bound (one when they are the same method; no lower bound, no comparisons against it);
    without a config, the schema's default roles."""
    grid = roles_of(config) if config is not None else default_roles()
    names = (grid["method_of_interest"], grid["lower_bound"])
    return tuple(dict.fromkeys(name for name in names if name))


def train_override_problems(override: dict, base: dict, where: str) -> list[str]:
    """What is wrong with some train keys laid over a (valid) train block: each key and value
    against the train block's schema, then the merged recipe as a whole."""
    schema = load_schema()
    train_schema = {**schema["$defs"]["dataset"]["properties"]["train"], "$defs": schema["$defs"]}
    train_schema.pop("required", None)
    errors = sorted(jsonschema.Draft202012Validator(train_schema).iter_errors(override),
                    key=lambda e: list(e.path))
    problems = [f"invalid value at '{where}{'.' if e.absolute_path else ''}"
                f"{'.'.join(map(str, e.absolute_path))}': {e.message}" for e in errors]
    return problems or _batch_problems({**base, **override}, where)


def train_patches(dcfg: dict) -> list[tuple[str, list[int]]]:
    """(key, patch) of every training patch of a dataset block: train.patch and each
    train_by_method entry's own."""
    return [("train.patch", dcfg["train"]["patch"])] + [
        (f"train_by_method.{m}.patch", o["patch"])
        for m, o in dcfg.get("train_by_method", {}).items() if "patch" in o]


def eval_patch(dcfg: dict) -> list[tuple[str, list[int]]]:
    """[("eval.patch", patch)] where the dataset sets its own window, else []."""
    return [("eval.patch", dcfg["eval"]["patch"])] if "patch" in dcfg.get("eval", {}) else []


def _eval_window_problems(dcfg: dict, where: str) -> list[str]:
    """eval.stride must not exceed the window (eval.patch, else each recipe's train.patch) on any
    axis: the voxels between two windows would never be predicted (background)."""
    stride = dcfg.get("eval", {}).get("stride")
    if stride is None:
        return []
    patches = eval_patch(dcfg) or train_patches(dcfg)
    problems = []
    for name, patch in patches:
        if len(stride) != len(patch):
            problems.append(f"{where}.eval.stride {stride}: expected {len(patch)} values, as "
                            f"{name} {patch}")
        elif any(s > p for s, p in zip(stride, patch)):
            problems.append(f"{where}.eval.stride {stride} exceeds the window ({name} {patch}) "
                            "on some axis: the voxels between two windows would never be "
                            "predicted; use a stride of at most the window")
    return problems


def _batch_problems(train: dict, where: str) -> list[str]:
    if train["labeled_batch_size"] > train["batch_size"]:
        return [(f"{where}.labeled_batch_size ({train['labeled_batch_size']}) must not exceed "
                 f"batch_size ({train['batch_size']})")]
    return []


def method_train_config(dcfg: dict, method: str, base: str | None = None) -> dict:
    """The training recipe of one method on one dataset: the dataset's train block, updated by
    its train_by_method entry for that method (the reference protocol), if any; a variant
    without its own entry takes its base method's."""
    by_method = dcfg.get("train_by_method", {})
    return {**dcfg["train"], **by_method.get(method, by_method.get(base or method, {}))}


def method_eval_config(config: dict, dataset: str, method: str) -> dict:
    """How `method`'s runs on `dataset` are scored: the dataset's eval block, updated by its
    eval_by_method entry (the post-processing of the method's own test script, reference
    protocol); a run-to-run twin or a variant without its own entry takes its method's."""
    dcfg = config["datasets"][dataset]
    by_method = dcfg.get("eval_by_method", {})
    base = noise_twins(config).get(method) or config.get("variants", {}).get(method, {}).get(
        "method")
    return {**dcfg["eval"], **by_method.get(method, by_method.get(base or method, {}))}


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config


def merge(base: dict, overlay: dict) -> dict:
    """Snakemake's layering of --configfile files: mappings merge key by key, anything else
    (lists included) is replaced by the later file's value."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


EXTENDS = "extends"


def read_layer(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One config file as a mapping, with the file it `extends` (a path relative to it) merged
    under it first: an overlay (config/reference.yaml) holds only what differs from its base."""
    raw = _read_yaml_mapping(path)
    base = raw.pop(EXTENDS, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {EXTENDS}: expected the file name of the base config "
                          f"(relative to {path.parent}), got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in _seen or base_path.resolve() == path.resolve():
        raise ConfigError(f"{path}: {EXTENDS}: {base} extends itself (a cycle of overlays)")
    if not base_path.is_file():
        raise ConfigError(f"{path}: {EXTENDS}: {base_path} is not a file")
    return merge(read_layer(base_path, (*_seen, path.resolve())), raw)


def declares_extends(path: str | Path) -> bool:
    raw = yaml.safe_load(Path(path).read_text())
    return isinstance(raw, dict) and EXTENDS in raw


def layered(*paths: str | Path) -> dict[str, Any]:
    """The files merged in order (each with its base), not yet validated."""
    config: dict[str, Any] = {}
    for each in paths:
        merge(config, read_layer(Path(each)))
    return config


def load_config(path: str | Path, *overlays: str | Path) -> dict[str, Any]:
    """A config file, or several layered as `snakemake --configfile a.yaml b.yaml` does (each
    with the base it `extends`), validated."""
    paths = [Path(path), *map(Path, overlays)]
    return validate_config(layered(*paths), source=" + ".join(map(str, paths)))


def dataset_config(config: dict, dataset: str) -> dict:
    try:
        return config["datasets"][dataset]
    except KeyError:
        known = ", ".join(sorted(config["datasets"]))
        raise ConfigError(f"dataset '{dataset}' is not in the config (configured: {known})") from None


class Layout:
    """Every path of one experiment, in one place, used by the CLI and by the Snakemake rules."""

    def __init__(self, config: dict, root: str | Path = "."):
        root = Path(root)
        name = config["name"]
        self.data = root / config["data_dir"] / name
        self.results = root / config["results_dir"] / name
        self.report = root / config["reports_dir"] / name
        self.logs = root / "logs" / name  # the workflow's job logs

    def job_log(self, rule: str, dataset: str, method: str, ratio: float | str,
                seed: int | str) -> Path:
        """The log of a run's `train` or `evaluate` job (the Snakefile's log: paths)."""
        tag = ratio if isinstance(ratio, str) else ratio_tag(ratio)
        return self.logs / rule / dataset / method / f"r{tag}" / f"s{seed}.log"

    def raw(self, dataset: str) -> Path:
        return self.data / "raw" / dataset

    def processed(self, dataset: str) -> Path:
        return self.data / "processed" / dataset

    def splits(self, dataset: str, seed: int) -> Path:
        return self.results / "splits" / dataset / f"seed{seed}.json"

    def run(self, dataset: str, method: str, ratio: float | str, seed: int) -> Path:
        tag = ratio if isinstance(ratio, str) else ratio_tag(ratio)
        return self.results / "runs" / dataset / method / f"r{tag}" / f"s{seed}"


NOISE_TWIN_SUFFIX = "_ulp"


def noise_twins(config: dict) -> dict[str, str]:
    """{twin name: method} of the run-to-run twins (config `noise_floor.methods`): the twin is the
    method trained again, same seed and recipe, with its initial weights moved by one ulp."""
    return {f"{m}{NOISE_TWIN_SUFFIX}": m for m in config.get("noise_floor", {}).get("methods", [])}


def expected_runs(config: dict) -> list[tuple[str, str, str, int]]:
    """(dataset, method, ratio tag, seed) of every run the grid asks for.

    Used by the Snakemake rules and by aggregation, so both agree on what is missing. The lower
    bound (roles.lower_bound) also runs at 100 % labels when full_supervision is on (the upper
    bound). A method in `datasets.<d>.skip_methods` (and its noise twin) has no run on <d>.
    """
    full = roles_of(config)["lower_bound"] if config["full_supervision"] else None
    twins = noise_twins(config)
    runs = []
    for dataset, dcfg in config["datasets"].items():
        skipped = set(dcfg.get("skip_methods", []))
        for method in [*config["methods"], *twins]:
            if twins.get(method, method) in skipped:
                continue
            ratios = list(config["ratios"])
            if full is not None and method == full:
                ratios.append(1.0)
            for ratio in ratios:
                for seed in config["seeds"]:
                    runs.append((dataset, method, ratio_tag(ratio), seed))
    return runs
