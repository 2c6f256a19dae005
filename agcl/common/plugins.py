"""Where method plugin files are searched (torch-free: the Snakefile reads it at parse time).

In order: the repository's own methods (shipped_plugin_dir: `baselines/` beside the package in
a checkout, else the installed copy, `agcl_baselines`), so that they are registered wherever
agcl runs; the folders of the AGCL_PLUGIN_DIRS environment variable (os.pathsep-separated); then
the config's `plugin_dirs`, or `baselines/` of the working directory without that key. The
workflow puts its own `baselines/` (beside the Snakefile) first and hands the variable to every
job, so `--directory` elsewhere still finds them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PLUGIN_DIRS_ENV = "AGCL_PLUGIN_DIRS"
DEFAULT_PLUGIN_DIRS = ("baselines",)


SHIPPED_PACKAGE = "agcl_baselines"  # pyproject.toml installs baselines/ under this name


def shipped_plugin_dir() -> Path | None:
    """The repository's own method files: `baselines/` beside this package when it runs from a
    checkout (an editable install, or PYTHONPATH as the workflow's jobs use), else the installed
    copy; None when neither is there."""
    checkout = Path(__file__).resolve().parents[2]  # agcl/common/plugins.py -> the checkout
    beside = checkout / "baselines"
    if (checkout / "pyproject.toml").is_file() and beside.is_dir():
        return beside
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def plugin_dirs(config: dict | None = None) -> list[Path]:
    """The plugin folders, absolute and without repeats, the shipped methods' first."""
    env = [d for d in os.environ.get(PLUGIN_DIRS_ENV, "").split(os.pathsep) if d]
    listed = (config or {}).get("plugin_dirs", list(DEFAULT_PLUGIN_DIRS))
    shipped = shipped_plugin_dir()
    return list(dict.fromkeys([*([shipped] if shipped else []),
                               *(Path(d).resolve() for d in [*env, *listed])]))


def export_plugin_dirs(first: Path) -> str:
    """Put `first` at the head of AGCL_PLUGIN_DIRS in this process (its jobs inherit it) and
    return the variable's value."""
    env = [d for d in os.environ.get(PLUGIN_DIRS_ENV, "").split(os.pathsep) if d]
    value = os.pathsep.join(dict.fromkeys([str(Path(first).resolve()), *env]))
    os.environ[PLUGIN_DIRS_ENV] = value
    return value
