"""Method plugins are files loaded from folders, not an installed package; a config may name more
folders, and what cannot be loaded says which file or folder."""

from __future__ import annotations

import sys

import pytest
import yaml

from agcl.config import ConfigError, load_config
from agcl.config.checks import check_config
from agcl.methods import registry
from tests.conftest import tiny_config

PLUGIN = '''
from agcl.methods import HParam, Method, register_method


@register_method("{name}")
class Plugin(Method):
    hyperparameters = {{"weight": HParam(1.0, low=0.0)}}
'''


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry.registered()))
    monkeypatch.setattr(registry, "_LOADED_DIRS", list(registry._LOADED_DIRS))
    monkeypatch.setattr(registry, "_FAILED", dict(registry._FAILED))
    yield
    for name in [m for m in sys.modules if m.startswith(f"{registry.PLUGIN_PACKAGE}.plug")]:
        del sys.modules[name]


def config_with(tmp_path, **keys):
    config = {**tiny_config(), **keys}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_the_builtin_baselines_are_plugin_files_not_a_package():
    cls = registry.get_method("bcp")
    assert cls.__module__ == f"{registry.PLUGIN_PACKAGE}.bcp"
    assert "baselines" not in sys.modules  # nothing imports baselines/ as a package


def test_a_config_names_a_plugin_folder_and_its_methods_are_checked(tmp_path, clean_registry):
    folder = tmp_path / "my_methods"
    folder.mkdir()
    (folder / "plug_a.py").write_text(PLUGIN.format(name="plug_a"))
    config = config_with(tmp_path, plugin_dirs=[str(folder)], methods=["plug_a"],
                         hparams={"plug_a": {"weight": 0.5}})
    check_config(config)
    assert registry.get_method("plug_a").hparams_for("la") == {"weight": 1.0}
    bad = config_with(tmp_path, plugin_dirs=[str(folder)], methods=["plug_a"],
                      hparams={"plug_a": {"weight": -2}})
    with pytest.raises(ConfigError, match="hparams.plug_a: plug_a hparam weight: expected >= 0.0"):
        check_config(bad)


def test_a_missing_plugin_folder_is_named(tmp_path, clean_registry):
    config = config_with(tmp_path, plugin_dirs=[str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match=r"plugin_dirs: .*nope is not a folder"):
        check_config(config)


def test_two_plugin_files_of_one_name_are_refused(tmp_path, clean_registry):
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "plug_b.py").write_text(PLUGIN.format(name=f"plug_b_{sub}"))
    registry.load_plugins([tmp_path / "one"])
    registry.load_plugins([tmp_path / "two"])
    assert "plug_b_one" in registry.list_methods() and "plug_b_two" not in registry.list_methods()
    with pytest.raises(KeyError, match="two plugin files are named plug_b.py"):
        registry.get_method("plug_b_two")


def test_a_plugin_that_fails_to_load_is_named_and_blocks_only_itself(tmp_path, clean_registry,
                                                                     capsys):
    from agcl.cli import main

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "plug_ok.py").write_text(PLUGIN.format(name="plug_ok"))
    (folder / "plug_broken.py").write_text(PLUGIN.format(name="plug_broken")
                                           + "\nimport not_a_module_anywhere\n")
    registry.load_plugins([folder])
    assert {"plug_ok", "supervised"} <= set(registry.list_methods())
    with pytest.raises(KeyError, match=r"unknown method 'plug_broken' .*plugin files that failed "
                                       r"to load; .*plug_broken.py:9: ModuleNotFoundError"):
        registry.get_method("plug_broken")
    assert main(["methods"]) == 0
    out = capsys.readouterr()
    assert "plug_ok" in out.out and "not loaded: " in out.err and "plug_broken.py:9" in out.err


@pytest.mark.parametrize("line", ["import agcl_plugins.plug_ok", "from plug_ok import Plugin",
                                  "from agcl_plugins.plug_ok import Plugin",
                                  "from . import plug_ok", "import agcl_baselines.bcp"])
def test_a_plugin_importing_another_plugin_is_refused_at_load_time(tmp_path, clean_registry,
                                                                   line):
    folder = tmp_path / "mine"
    folder.mkdir()
    # "plug_ok" sorts after "plug_a": the import would work by file-name order
    (folder / "plug_ok.py").write_text(PLUGIN.format(name="plug_ok"))
    (folder / "plug_a.py").write_text(f"{line}\n" + PLUGIN.format(name="plug_a"))
    registry.load_plugins([folder])
    assert "plug_a" not in registry.list_methods() and "plug_ok" in registry.list_methods()
    why = registry.failed_plugins()[folder / "plug_a.py"]
    assert "plug_a.py:1: imports" in why and "a plugin imports from agcl only" in why
