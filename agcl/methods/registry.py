"""Method registry: every method is one file with `@register_method("name")` on its class.

Methods are found by importing every module of `agcl.methods` and of the top-level `baselines`
package, so a new file in `baselines/` appears in `agcl methods` and in the workflow
without an edit anywhere else. Import errors are re-raised, never swallowed.
"""

from __future__ import annotations

import importlib
import pkgutil

_METHODS: dict[str, type] = {}
_SCANNED = False
_SCANNED_PACKAGES = ("agcl.methods", "baselines")


def register_method(name: str):
    def decorator(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(
                f"method '{name}' is registered twice: {_METHODS[name].__module__} and {cls.__module__}"
            )
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    for package_name in _SCANNED_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    _SCANNED = True


def list_methods() -> list[str]:
    _scan()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    _scan()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method '{name}' (registered: {', '.join(sorted(_METHODS))})") from None


def resolve_method(config: dict, name: str) -> tuple[type, dict]:
    """(registered class, hyperparameters it adds) of a name in `methods:`: a registered method,
    or a variant of one declared under `variants:` (an ablation: the method with some
    hyperparameters changed, trained and reported under its own name)."""
    variant = config.get("variants", {}).get(name)
    if variant is None:
        return get_method(name), {}
    return get_method(variant["method"]), dict(variant.get("hparams", {}))


def check_config(config: dict, source: str = "<config>") -> None:
    """Config errors that need the registry, found before any job runs: every name in `methods:`
    is registered, every `hparams:` block names a registered method and only its hyperparameters,
    and every `datasets.<d>.net` option exists on the net each configured method builds."""
    from agcl.config import ConfigError
    from agcl.data.specs import get_spec
    from agcl.methods.base import HparamError
    from agcl.nets.registry import check_kwargs

    _scan()
    registered = ", ".join(sorted(_METHODS))
    variants = config.get("variants", {})
    problems = [f"methods[{i}]: '{name}' is not a registered method or a variant (registered: "
                f"{registered}; variants: {', '.join(sorted(variants)) or 'none'})"
                for i, name in enumerate(config["methods"])
                if name not in _METHODS and name not in variants]
    for name, variant in variants.items():
        if name in _METHODS:
            problems.append(f"variants.{name}: the name of a registered method; a variant needs "
                            "its own name")
        elif variant["method"] not in _METHODS:
            problems.append(f"variants.{name}.method: '{variant['method']}' is not a registered "
                            f"method (registered: {registered})")
        else:
            try:
                for d in config["datasets"]:
                    _METHODS[variant["method"]].hparams_for(d, variant.get("hparams", {}))
            except HparamError as exc:
                problems.append(f"variants.{name}.hparams: {exc.args[0]}")
    for dataset, dcfg in config["datasets"].items():
        problems += [f"datasets.{dataset}.train_by_method.{name}: '{name}' is not a registered "
                     f"method (registered: {registered})"
                     for name in dcfg.get("train_by_method", {})
                     if name not in _METHODS and name not in variants]
    blocks = [("hparams", config.get("hparams", {}), None)]
    blocks += [(f"datasets.{d}.hparams", dcfg.get("hparams", {}), d)
               for d, dcfg in config["datasets"].items()]
    for where, block, dataset in blocks:
        for name, values in block.items():
            if name not in _METHODS:
                problems.append(f"{where}.{name}: '{name}' is not a registered method "
                                f"(registered: {registered})")
                continue
            try:
                for d in [dataset] if dataset else list(config["datasets"]):
                    _METHODS[name].hparams_for(d, values)
            except HparamError as exc:
                problems.append(f"{where}.{name}: {exc.args[0]}")
    for dataset, dcfg in config["datasets"].items():
        spec = get_spec(dataset)
        bases = [variants[m]["method"] if m in variants else m for m in config["methods"]]
        nets = sorted({_METHODS[m].net_name(spec) for m in bases if m in _METHODS})
        for net in nets:
            try:
                check_kwargs(net, dcfg.get("net", {}), where=f"datasets.{dataset}.net")
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(dict.fromkeys(problems)))
