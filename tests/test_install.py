"""A non-editable install of the package works on its own: `python -m agcl aggregate` and
`report` load a config (the schema is package data) and write the summary tables and the page
from another working directory, with only the installed copy importable (no checkout), and
every shipped method (baselines/, installed as agcl_baselines) is registered there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agcl.config import Layout
from tests.test_report import fake_metrics, fixture_config, write_evaluated_run

REPO = Path(__file__).resolve().parents[1]
SUMMARY_TABLES = ("per_case", "runs", "summary", "missing", "case_means", "stats",
                  "run_to_run", "published")


def installed_copy(tmp_path: Path) -> Path:
    """`pip install --target` of a copy of the sources (setuptools builds in the source tree:
    the copy keeps build/ and *.egg-info out of the checkout)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("agcl", "baselines"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(target)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_a_non_editable_install_aggregates_and_reports_outside_the_checkout(tmp_path):
    target = installed_copy(tmp_path)
    assert (target / "agcl" / "schemas" / "config.schema.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run_installed(target, work, "-c", "import agcl; print(agcl.__file__)")
    assert where.returncode == 0 and where.stdout.strip().startswith(str(target)), where.stderr

    config = fixture_config()
    layout = Layout(config, work)
    for method in config["methods"]:
        for ratio in config["ratios"]:
            for seed in config["seeds"]:
                write_evaluated_run(layout.run("la", method, ratio, seed),
                                    fake_metrics(method, ratio, seed, "metrics_reloaded"),
                                    train_seconds=60, parameters=1, device="cpu", amp="off")
    (work / "fixture.yaml").write_text(yaml.safe_dump(config))

    out = run_installed(target, work, "-m", "agcl", "aggregate", "--config", "fixture.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "aggregated 8 runs (0 missing)" in out.stdout
    for name in SUMMARY_TABLES:
        assert (layout.results / "summary" / f"{name}.csv").is_file(), name
    out = run_installed(target, work, "-m", "agcl", "report", "--config", "fixture.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'id="stats-table"' in (layout.report / "index.html").read_text()
    # a bad value is named from the installed schema, as from the checkout
    bad = {**config, "seeds": "zero"}
    (work / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = run_installed(target, work, "-m", "agcl", "aggregate", "--config", "bad.yaml")
    assert out.returncode == 1 and "invalid value at 'seeds'" in out.stderr


def test_the_package_list_names_every_folder_of_the_package():
    import tomllib
    from setuptools import find_packages

    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(p for p in listed if p.startswith("agcl.") or p == "agcl") == sorted(
        find_packages(str(REPO), include=["agcl*"]))
    assert "agcl_baselines" in listed


@pytest.mark.slow
def test_every_shipped_method_is_registered_outside_the_checkout(tmp_path):
    target = installed_copy(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = run_installed(target, work, "-m", "agcl", "methods")
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    shipped = {p.stem for p in (REPO / "baselines").glob("*.py") if not p.name.startswith("_")}
    assert shipped | {"semi_agcl"} <= listed
    # a user's own plugin folder in the working directory adds to them
    (work / "baselines").mkdir()
    (work / "baselines" / "mine.py").write_text(
        "from agcl.methods import Method, register_method\n\n\n"
        "@register_method('mine')\nclass Mine(Method):\n    pass\n")
    out = run_installed(target, work, "-m", "agcl", "methods")
    assert out.returncode == 0, out.stderr
    assert {"mine", "supervised"} <= {line.split()[0] for line in out.stdout.splitlines()
                                      if line.strip()}
