"""Data flows one way: data -> nets -> methods -> engine -> eval -> report.

Checked on the imports themselves (ast), so a shortcut such as evaluation reaching into the
training engine for a constant fails here. The run folder's rules live in agcl.runfolder alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "agcl"
ORDER = ["data", "nets", "methods", "engine", "eval", "report"]


def agcl_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agcl"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("agcl")}
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


@pytest.mark.parametrize("layer", ORDER)
def test_no_layer_imports_a_later_one(layer):
    later = set(ORDER[ORDER.index(layer) + 1:])
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        bad = sorted(m for m in agcl_imports(path) if layer_of(m) in later)
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


@pytest.mark.parametrize("layer", ["eval", "report"])
def test_evaluation_and_report_never_import_the_training_engine(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        bad = sorted(m for m in agcl_imports(path) if layer_of(m) == "engine")
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_run_folder_file_names_are_defined_once():
    names = ("ckpt_final.pt", "ckpt_last.pt", "ckpt_best.pt", "run.json", "metrics.json",
             "predictions.npz", "train_log.csv")
    sources = [p for p in PACKAGE.rglob("*.py") if p.name != "runfolder.py"]
    sources += sorted((PACKAGE.parent / "workflow").rglob("*.smk"))
    for path in sources:
        text = path.read_text()
        for name in names:
            assert f'"{name}"' not in text, f"{path} spells {name} itself; use agcl.runfolder"
