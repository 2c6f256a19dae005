"""Method registry: every method is one file with `@register_method("name")` on its class.

Methods come from two places: the modules of `agcl.methods` (Semi-AGCL, the method of this
kit) and plugin files, the `*.py` files of the plugin folders: `baselines/` in the working
directory by default, the folders a config lists under `plugin_dirs` (relative to the working
directory, as every path of a config), and those in the AGCL_PLUGIN_DIRS environment variable
(os.pathsep-separated). A plugin file is loaded by path, not imported as a package, so a new
file in `baselines/` appears in `agcl methods` and in the workflow without an edit anywhere
else. A plugin imports from `agcl` only, never another plugin (refused before the file runs).
A file that fails to load is recorded (failed_plugins) and blocks only its own methods: asking
for a method that is not registered names the files that failed and why.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import sys
import traceback
from pathlib import Path

from agcl.common.plugins import plugin_dirs

_METHODS: dict[str, type] = {}
# Plugin files that failed to load: path -> why. A broken file blocks only its own methods.
_FAILED: dict[Path, str] = {}
_SCANNED = False
_LOADED_DIRS: list[Path] = []
# Loaded plugin files live in sys.modules under this prefix plus the file's stem.
PLUGIN_PACKAGE = "agcl_plugins"


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


def load_plugins(dirs: list[Path], required: bool = False) -> None:
    """Load every plugin file of these folders not loaded yet. `required`: a folder that does
    not exist is an error (a config named it); the default folder may be absent."""
    for folder in dirs:
        if folder in _LOADED_DIRS:
            continue
        if not folder.is_dir():
            if required:
                raise FileNotFoundError(f"plugin_dirs: {folder} is not a folder (expected a "
                                        "folder of method files, e.g. baselines/)")
            continue
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                try:
                    _load_plugin_file(path)
                except PluginImportRefused as exc:
                    _FAILED[path] = str(exc)
                except Exception as exc:  # noqa: BLE001 - reported by name, others still load
                    _FAILED[path] = _load_failure(path, exc)
        _LOADED_DIRS.append(folder)


class PluginImportRefused(ImportError):
    """A plugin file imports another plugin file."""


# What a plugin may not import: another plugin, however it is reached.
_PLUGIN_MODULE_ROOTS = (PLUGIN_PACKAGE, "agcl_baselines", "baselines")


def refuse_plugin_imports(path: Path) -> None:
    """A plugin imports from agcl only, never another plugin (its import would work or fail by
    file-name order): refused before the file runs, with the rule."""
    siblings = {p.stem for p in path.parent.glob("*.py")} - {path.stem}
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names = ["." * node.level + (node.module or "")]
        for name in names:
            root = name.split(".")[0]
            if name.startswith(".") or root in _PLUGIN_MODULE_ROOTS or root in siblings:
                raise PluginImportRefused(
                    f"{path}:{node.lineno}: imports {name!r}, another plugin: a plugin imports "
                    "from agcl only, never another plugin file (copy what it needs, or move "
                    "shared code into agcl)")


def _load_failure(path: Path, exc: Exception) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve() == path.resolve()]
    line = f":{frames[-1].lineno}" if frames else ""
    return f"{path}{line}: {type(exc).__name__}: {exc}"


def _load_plugin_file(path: Path) -> None:
    module_name = f"{PLUGIN_PACKAGE}.{path.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        first = Path(loaded.__file__).resolve()
        # the installed copy of a shipped method and the checkout's file are one method
        if first != path.resolve() and first.read_bytes() != path.read_bytes():
            raise ValueError(f"two plugin files are named {path.name}: {loaded.__file__} and "
                             f"{path} (rename one)")
        return
    refuse_plugin_imports(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        for name in [n for n, c in _METHODS.items() if c.__module__ == module_name]:
            del _METHODS[name]  # registered before the line that failed: half a file is none
        raise


def _scan() -> None:
    global _SCANNED
    if not _SCANNED:
        package = importlib.import_module("agcl.methods")
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"agcl.methods.{info.name}")
        _SCANNED = True
    load_plugins(plugin_dirs())


def use_config(config: dict) -> None:
    """Load the plugin folders a config names (each must exist)."""
    _scan()
    if "plugin_dirs" in config:
        load_plugins(plugin_dirs(config), required=True)


def list_methods() -> list[str]:
    _scan()
    return sorted(_METHODS)


def _searched() -> str:
    return ", ".join(map(str, _LOADED_DIRS)) or "none found"


def failed_plugins() -> dict[Path, str]:
    """Plugin files that could not be loaded, and why (their methods are not registered)."""
    _scan()
    return dict(_FAILED)


def get_method(name: str) -> type:
    _scan()
    try:
        return _METHODS[name]
    except KeyError:
        failed = "".join(f"; {why}" for why in _FAILED.values())
        raise KeyError(f"unknown method '{name}' (registered: {', '.join(sorted(_METHODS))}; "
                       f"plugin folders: {_searched()}"
                       + (f"; plugin files that failed to load{failed}" if failed else "")
                       + ")") from None


def method_module(name: str):
    """The module (plugin file or agcl.methods module) that registers method `name`."""
    return sys.modules[get_method(name).__module__]


def resolve_method(config: dict, name: str) -> tuple[type, dict]:
    """(registered class, hyperparameters it adds) of a name in `methods:`: a registered method,
    or a variant of one declared under `variants:` (an ablation: the method with some
    hyperparameters changed, trained and reported under its own name)."""
    use_config(config)
    variant = config.get("variants", {}).get(name)
    if variant is None:
        return get_method(name), {}
    return get_method(variant["method"]), dict(variant.get("hparams", {}))


def registered() -> dict[str, type]:
    """Every registered method, by name (plugins of the default folders loaded)."""
    _scan()
    return dict(_METHODS)
