"""Data flows one way: foundation -> data -> nets -> methods (and the plugins in baselines/) ->
configuration -> engine -> eval -> report -> the CLI; the benchmarks sit on top.

Checked on the imports themselves (ast), over every module of the package, every plugin file and
every benchmark script, so a shortcut such as evaluation reaching into the training engine for a
constant fails here. Every module is placed by its folder (only __main__ sits at the package root);
the run folder's rules live in agcl.runtime.runfolder alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "agcl"
# Every module of the package on one layer, lowest first: a module imports its own layer or
# lower ones. Sub-packages are named by their folder, root modules by their file.
LAYERS = [
    ("foundation", {"agcl", "common", "runtime"}),
    ("data", {"data"}),
    ("nets", {"nets"}),
    ("methods", {"methods", "baselines"}),
    ("configuration", {"config"}),
    ("engine", {"engine"}),
    ("eval", {"eval"}),
    ("report", {"report"}),
    ("cli", {"cli", "__main__"}),
    ("benchmarks", {"benchmarks"}),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}
PLUGINS = sorted((REPO / "baselines").glob("*.py"))
SOURCES = sorted(PACKAGE.rglob("*.py")) + PLUGINS + sorted((REPO / "benchmarks").glob("*.py"))


def unit_of(path: Path) -> str:
    """The layer name of a source file: its sub-package, root module, or top-level folder."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] != "agcl":
        return parts[0]
    if len(parts) == 2 and parts[1] == "__init__":
        return "agcl"
    return parts[1]


def agcl_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agcl"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("agcl")}
    return found


def imported_unit(module: str) -> str | None:
    """The layer name of an imported agcl module (None: a name that is not a module)."""
    parts = module.split(".")
    if parts[0] != "agcl":
        return None
    if len(parts) == 1:
        return "agcl"
    return parts[1] if parts[1] in RANK else None


def test_every_module_is_on_a_layer():
    units = {unit_of(path) for path in SOURCES}
    assert units - set(RANK) == set(), "place these on a layer in LAYERS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_higher_layer(path):
    rank = RANK[unit_of(path)]
    bad = sorted(m for m in agcl_imports(path)
                 if (unit := imported_unit(m)) is not None and RANK[unit] > rank)
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("layer", ["eval", "report"])
def test_evaluation_and_report_never_import_the_training_engine(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        bad = sorted(m for m in agcl_imports(path) if imported_unit(m) == "engine")
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", PLUGINS, ids=lambda p: p.name)
def test_a_plugin_imports_the_package_only_never_another_plugin(path):
    from agcl.methods.registry import refuse_plugin_imports

    refuse_plugin_imports(path)  # the rule the registry applies when it loads the file


def test_the_dag_side_imports_no_engine():
    """recipe resolution and the config checks serve the DAG and `agcl plan`: no engine."""
    for name in ("config/recipe.py", "config/checks.py", "report/plan.py", "config/load.py"):
        bad = sorted(m for m in agcl_imports(PACKAGE / name) if imported_unit(m) == "engine")
        assert not bad, f"agcl/{name} imports {bad}"
    for path in sorted((REPO / "workflow").rglob("*.smk")):
        assert "agcl.engine" not in path.read_text(), f"{path} imports the engine"


def test_run_folder_file_names_are_defined_once():
    names = ("ckpt_final.pt", "ckpt_last.pt", "ckpt_best.pt", "run.json", "metrics.json",
             "predictions.npz", "train_log.csv")
    sources = [p for p in PACKAGE.rglob("*.py") if p.name != "runfolder.py"]
    sources += sorted((PACKAGE.parent / "workflow").rglob("*.smk"))
    for path in sources:
        text = path.read_text()
        for name in names:
            assert f'"{name}"' not in text, f"{path} spells {name} itself; use agcl.runtime.runfolder"


def test_an_evaluation_job_imports_neither_methods_nor_the_engine():
    """What `agcl evaluate` loads: the nets and the metrics, not the method registry, its
    plugins or the training engine (a job pays only for what it uses)."""
    import subprocess
    import sys

    code = ("import sys, agcl.cli, agcl.eval.evaluate; "
            "print(' '.join(m for m in sys.modules if m.startswith(('agcl.methods', "
            "'agcl.engine', 'agcl_plugins', 'agcl.report'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_reading_declarations_without_torch_refuses_to_compute_with_it(tmp_path):
    """The planning stand-in lets a method file import torch, decorate with it and subclass
    nn.Module, but computing with torch at import time stops with a message naming the call."""
    import subprocess
    import sys

    code = (
        "from agcl.config.torch_stand_in import declarations_only; declarations_only()\n"
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n    @torch.no_grad()\n    def f(self):\n        return 1\n"
        "assert Net().f() == 1\n"
        "import plugin_at_import\n")
    # line 3 of a plugin computes at import time
    (tmp_path / "plugin_at_import.py").write_text("import torch\n\nTABLE = torch.zeros(3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, cwd=tmp_path)
    assert out.returncode != 0
    assert "TorchMissing: torch.zeros was used while planning" in out.stderr
    assert "a stand-in for torch (agcl/config/torch_stand_in.py), installed or not" in out.stderr
    assert f"{tmp_path / 'plugin_at_import.py'}:3 does" in out.stderr


def test_nothing_but_the_entry_point_sits_at_the_package_root():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"], loose


def test_no_module_is_over_about_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 430}
    assert not long, long
