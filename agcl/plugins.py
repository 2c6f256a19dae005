"""Where method plugin files are searched (torch-free: the Snakefile reads it at parse time).

In order: the folders of the AGCL_PLUGIN_DIRS environment variable (os.pathsep-separated), then
the config's `plugin_dirs`, or `baselines/` of the working directory without that key. The
workflow puts its own `baselines/` (beside the Snakefile) first and hands the variable to every
job, so `--directory` elsewhere still finds them.
"""

from __future__ import annotations

import os
from pathlib import Path

PLUGIN_DIRS_ENV = "AGCL_PLUGIN_DIRS"
DEFAULT_PLUGIN_DIRS = ("baselines",)


def plugin_dirs(config: dict | None = None) -> list[Path]:
    """The plugin folders, absolute and without repeats."""
    env = [d for d in os.environ.get(PLUGIN_DIRS_ENV, "").split(os.pathsep) if d]
    listed = (config or {}).get("plugin_dirs", list(DEFAULT_PLUGIN_DIRS))
    return list(dict.fromkeys(Path(d).resolve() for d in [*env, *listed]))


def export_plugin_dirs(first: Path) -> str:
    """Put `first` at the head of AGCL_PLUGIN_DIRS in this process (its jobs inherit it) and
    return the variable's value."""
    env = [d for d in os.environ.get(PLUGIN_DIRS_ENV, "").split(os.pathsep) if d]
    value = os.pathsep.join(dict.fromkeys([str(Path(first).resolve()), *env]))
    os.environ[PLUGIN_DIRS_ENV] = value
    return value
