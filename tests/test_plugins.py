"""Method plugins are files loaded from folders, not an installed package; a config may name more
folders, and what cannot be loaded says which file or folder."""

from __future__ import annotations

import sys

import pytest
import yaml

from agcl.config import ConfigError, load_config
from agcl.config_checks import check_config
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
    with pytest.raises(ValueError, match="two plugin files are named plug_b.py"):
        registry.load_plugins([tmp_path / "two"])
