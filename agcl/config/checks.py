"""Config checks that need the method registry, run once when a config is loaded for a DAG
or a run: every name in `methods:` is registered, every `hparams:` block names a registered
method and only hyperparameters it declares, with allowed values, and every `datasets.<d>.net`
option exists on the net each configured method builds."""

from __future__ import annotations

from agcl.config import ConfigError, eval_patch, train_patches
from agcl.data.specs import get_spec
from agcl.methods.hparams import HparamError
from agcl.methods.registry import registered, use_config
from agcl.nets.registry import check_kwargs


def check_config(config: dict, source: str = "<config>") -> None:
    """Config errors that need the registry, found before any job runs: every name in `methods:`
    is registered, every `hparams:` block names a registered method and only its hyperparameters,
    and every `datasets.<d>.net` option exists on the net each configured method builds."""
    try:
        use_config(config)
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    methods = registered()
    names = ", ".join(sorted(methods))
    variants = config.get("variants", {})
    problems = [f"methods[{i}]: '{name}' is not a registered method or a variant (registered: "
                f"{names}; variants: {', '.join(sorted(variants)) or 'none'})"
                for i, name in enumerate(config["methods"])
                if name not in methods and name not in variants]
    for name, variant in variants.items():
        if name in methods:
            problems.append(f"variants.{name}: the name of a registered method; a variant needs "
                            "its own name")
        elif variant["method"] not in methods:
            problems.append(f"variants.{name}.method: '{variant['method']}' is not a registered "
                            f"method (registered: {names})")
        else:
            try:
                for d in config["datasets"]:
                    methods[variant["method"]].hparams_for(d, variant.get("hparams", {}))
            except HparamError as exc:
                problems.append(f"variants.{name}.hparams: {exc.args[0]}")
    for dataset, dcfg in config["datasets"].items():
        problems += [f"datasets.{dataset}.{block}.{name}: '{name}' is not a registered "
                     f"method (registered: {names})"
                     for block in ("train_by_method", "eval_by_method")
                     for name in dcfg.get(block, {})
                     if name not in methods and name not in variants]
    blocks = [("hparams", config.get("hparams", {}), None)]
    blocks += [(f"datasets.{d}.hparams", dcfg.get("hparams", {}), d)
               for d, dcfg in config["datasets"].items()]
    blocks += [(f"datasets.{d}.hparams_by_ratio.{ratio}", block, d)
               for d, dcfg in config["datasets"].items()
               for ratio, block in dcfg.get("hparams_by_ratio", {}).items()]
    for where, block, dataset in blocks:
        for name, values in block.items():
            if name not in methods:
                problems.append(f"{where}.{name}: '{name}' is not a registered method "
                                f"(registered: {names})")
                continue
            try:
                for d in [dataset] if dataset else list(config["datasets"]):
                    methods[name].hparams_for(d, values)
            except HparamError as exc:
                problems.append(f"{where}.{name}: {exc.args[0]}")
    for dataset, dcfg in config["datasets"].items():
        spec = get_spec(dataset)
        problems += [f"datasets.{dataset}.{where} {patch}: {dataset} trains and predicts on "
                     f"{spec.spatial_dims}D patches, expected {spec.spatial_dims} values"
                     for where, patch in train_patches(dcfg) + eval_patch(dcfg)
                     if len(patch) != spec.spatial_dims]
        skipped = dcfg.get("skip_methods", [])
        # A skip of a method the grid does not run is harmless (an overlay may narrow methods);
        # a name that is no method at all is a typo.
        problems += [f"datasets.{dataset}.skip_methods: '{name}' is not a registered method or "
                     f"a variant (registered: {names})"
                     for name in skipped if name not in methods and name not in variants]
        problems += [f"datasets.{dataset}.skip_methods: '{name}' is roles.{role}, which every "
                     "dataset needs" for role, name in config.get("roles", {}).items()
                     if name in skipped]
        base_of = {m: variants[m]["method"] if m in variants else m for m in config["methods"]
                   if m not in skipped}
        bases = []  # the registered methods that train on this dataset
        for name, base in base_of.items():
            reason = methods[base].unsupported(spec) if base in methods else None
            if reason:
                problems.append(f"methods: {name} cannot train on {dataset} ({reason}): add it "
                                f"to datasets.{dataset}.skip_methods, or remove {dataset}")
            elif base in methods:
                bases.append(base)
        nets = sorted({methods[m].net_name(spec) for m in bases})
        for net in nets:
            try:
                check_kwargs(net, dcfg.get("net", {}), where=f"datasets.{dataset}.net")
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(dict.fromkeys(problems)))
