"""Both conda environment files hold every third-party package the code imports, pinned, with a
CUDA build of torch; pyproject.toml declares the same packages for pip."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = [REPO / "environment.yml", REPO / "workflow" / "envs" / "agcl.yaml"]
# import name -> conda package (where they differ); torch must be the CUDA build
CONDA_NAME = {"torch": "pytorch-gpu", "PIL": "pillow", "yaml": "pyyaml"}
PIP_NAME = {"PIL": "pillow", "yaml": "pyyaml"}
# imported inside functions or by tools, not at module level of agcl/ and baselines/
LAZY = {"tensorboard": "tensorboard", "medpy": "medpy"}


def imported_packages() -> set[str]:
    names = set()
    for path in [*(REPO / "agcl").rglob("*.py"), *(REPO / "baselines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in {"agcl", "baselines"}}


def conda_packages(path: Path) -> dict[str, str]:
    """package -> version spec of a conda environment file."""
    specs = {}
    for entry in yaml.safe_load(path.read_text())["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", entry).groups()
        specs[name] = spec
    return specs


def test_the_import_scan_sees_the_code():
    assert {"torch", "numpy", "h5py", "PIL", "yaml"} <= imported_packages()


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_file_has_every_import_pinned(env_file):
    packages = conda_packages(env_file)
    needed = {CONDA_NAME.get(n, n) for n in imported_packages()} | set(LAZY.values())
    missing = sorted(needed - set(packages))
    assert not missing, f"{env_file.name} lacks {missing}"
    for name in needed:
        assert packages[name].startswith("="), f"{env_file.name}: {name} is not pinned"
    assert "pytorch" not in packages, "plain pytorch may resolve to the CPU build"
    assert packages["cuda-version"], "pytorch-gpu needs a CUDA version constraint"


def test_pyproject_declares_every_import():
    text = (REPO / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    declared = {re.match(r'\s*"([A-Za-z0-9_.-]+)', line).group(1).lower()
                for line in block.splitlines() if line.strip().startswith('"')}
    needed = {PIP_NAME.get(n, n).lower() for n in imported_packages()} | {"medpy"}
    assert not sorted(needed - declared), sorted(needed - declared)
