import copy
from pathlib import Path

import pytest
import yaml

from agcl.config import ConfigError, Layout, expected_runs, load_config, validate_config
from agcl.utils import ratio_tag

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "config" / "demo.yaml"
PAPER = REPO_ROOT / "config" / "config.yaml"


def raw(path):
    return yaml.safe_load(path.read_text())


def test_shipped_configs_validate_and_get_defaults():
    demo = load_config(DEMO)
    assert demo["datasets"]["la"]["eval"]["empty_policy"] == "metrics_reloaded"
    assert demo["datasets"]["la"]["selection"] == "last"
    paper = load_config(PAPER)
    assert paper["datasets"]["la"]["train"]["patch"] == [112, 112, 80]
    assert paper["datasets"]["acdc"]["selection"] == "best_val"


def test_paper_grid_size():
    paper = load_config(PAPER)
    datasets, methods, seeds = len(paper["datasets"]), len(paper["methods"]), len(paper["seeds"])
    full = 1 if "supervised" in paper["methods"] else 0
    assert len(expected_runs(paper)) == datasets * seeds * (methods * 2 + full)
    assert ("la", "supervised", "1", 0) in expected_runs(paper)


@pytest.mark.parametrize("path,value,key", [
    (("datasets", "la", "train", "iterations"), 0, "datasets.la.train.iterations"),
    (("ratios",), [0.0], "ratios.0"),
    (("datasets", "acdc", "source"), "ftp", "datasets.acdc.source"),
    (("seeds",), "zero", "seeds"),
])
def test_bad_values_name_the_key(path, value, key):
    config = raw(DEMO)
    node = config
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(config, "demo.yaml")


def test_unknown_key_is_rejected():
    config = raw(DEMO)
    config["datasets"]["la"]["trian"] = {}
    with pytest.raises(ConfigError, match="'trian' was unexpected"):
        validate_config(config, "demo.yaml")


def test_labeled_batch_larger_than_batch():
    config = raw(DEMO)
    config["datasets"]["la"]["train"]["labeled_batch_size"] = 9
    with pytest.raises(ConfigError, match="labeled_batch_size"):
        validate_config(config, "demo.yaml")


def test_validation_does_not_share_defaults_between_datasets():
    config = validate_config(copy.deepcopy(raw(DEMO)))
    config["datasets"]["la"]["net"]["extra"] = 1
    assert "extra" not in config["datasets"]["crag"]["net"]


def test_ratio_tag_and_layout():
    assert [ratio_tag(r) for r in (0.05, 0.1, 1.0, 0.25)] == ["0.05", "0.1", "1", "0.25"]
    layout = Layout(load_config(DEMO), root="/x")
    assert str(layout.run("la", "supervised", 0.05, 1)) == "/x/results/demo/runs/la/supervised/r0.05/s1"
    assert str(layout.splits("acdc", 2)) == "/x/results/demo/splits/acdc/seed2.json"


def test_train_by_method_is_checked_like_the_train_block():
    from agcl.config import method_train_config

    config = load_config(REPO_ROOT / "config" / "reference.yaml")
    assert config["protocol"] == "reference"
    la = config["datasets"]["la"]
    assert method_train_config(la, "ua_mt")["iterations"] == 6000
    assert method_train_config(la, "ua_mt")["patch"] == [112, 112, 80]  # from the train block
    assert method_train_config(la, "bcp") == la["train"]
    bad = copy.deepcopy(config)
    bad["datasets"]["la"]["train_by_method"]["mc_net"]["iteration"] = 5
    with pytest.raises(ConfigError, match=r"datasets\.la\.train_by_method\.mc_net': Additional "
                                          r"properties are not allowed \('iteration'"):
        validate_config(bad)
    bad = copy.deepcopy(config)
    bad["datasets"]["la"]["train_by_method"]["mc_net"]["labeled_batch_size"] = 9
    with pytest.raises(ConfigError, match=r"train_by_method\.mc_net\.labeled_batch_size \(9\) "
                                          r"must not exceed batch_size \(4\)"):
        validate_config(bad)
    bad = copy.deepcopy(config)
    bad["datasets"]["acdc"]["train_by_method"]["ua_mt"]["schedule"] = "cosine"
    with pytest.raises(ConfigError, match=r"train_by_method\.ua_mt\.schedule': 'cosine' is not"):
        validate_config(bad)


def test_train_by_method_names_a_registered_method():
    from agcl.config_checks import check_config

    config = load_config(REPO_ROOT / "config" / "reference.yaml")
    config["datasets"]["la"]["train_by_method"]["uamt"] = {"iterations": 5}
    with pytest.raises(ConfigError, match=r"train_by_method\.uamt: 'uamt' is not a registered"):
        check_config(config)


def test_cpu_study_is_acdc_every_method_between_the_bounds():
    from agcl.methods.registry import list_methods

    config = load_config(REPO_ROOT / "config" / "cpu_study.yaml")
    # at least 8 seeds: the seed is the unit of the statistics (a sign-flip test needs >= 6)
    assert list(config["datasets"]) == ["acdc"] and config["seeds"] == list(range(8))
    assert set(config["methods"]) == set(list_methods())  # bcp included
    twins = {"supervised_ulp", "bcp_ulp"}  # the noise floor of the lower bound and of bcp
    runs = expected_runs(config)
    assert {(m, r) for _, m, r, _ in runs} == {*((m, "0.05") for m in [*config["methods"], *twins]),
                                              ("supervised", "1")}
    assert len(runs) == 8 * (len(config["methods"]) + 1 + len(twins))


def test_layered_config_files_merge_like_snakemake(tmp_path):


    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("name: layered\nratios: [0.2]\ndatasets:\n  la:\n    train: {lr: 0.5}\n")
    base = REPO_ROOT / "config" / "demo.yaml"
    config = load_config(base, overlay)
    plain = load_config(base)
    assert config["name"] == "layered" and config["ratios"] == [0.2]  # lists are replaced
    # mappings merge key by key: the overlay's lr, every other train key from the base
    assert config["datasets"]["la"]["train"]["lr"] == 0.5
    assert {k: v for k, v in config["datasets"]["la"]["train"].items() if k != "lr"} == {
        k: v for k, v in plain["datasets"]["la"]["train"].items() if k != "lr"}
    assert set(config["datasets"]) == set(plain["datasets"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratios: [2]\n")
    with pytest.raises(ConfigError, match=r"demo.yaml \+ .*bad.yaml: invalid value at 'ratios.0'"):
        load_config(base, bad)
