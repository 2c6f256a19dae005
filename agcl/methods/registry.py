"""Method registry: every method is one file with `@register_method("name")` on its class.

Methods are found by importing every module of `agcl.methods` and of the top-level `baselines`
package, so a new file in `baselines/` appears in `agcl train --list-methods` and in the workflow
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
