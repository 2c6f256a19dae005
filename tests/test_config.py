import copy
from pathlib import Path

import pytest
import yaml

from agcl.common.utils import ratio_tag
from agcl.config import ConfigError, Layout, expected_runs, load_config, validate_config

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
    seeds = len(paper["seeds"])
    full = 1 if "supervised" in paper["methods"] else 0
    # dtc and sassnet (3D only) train on LA alone, cps, unimatch and abd (2D only) on ACDC and
    # CRAG: 3 x 14 methods - 2 x 2 - 3 skipped = 35 pairs
    pairs = sum(len(set(paper["methods"]) - set(d["skip_methods"]))
                for d in paper["datasets"].values())
    assert pairs == 35
    assert len(expected_runs(paper)) == seeds * (pairs * 2 + len(paper["datasets"]) * full)
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
    from agcl.config.checks import check_config

    config = load_config(REPO_ROOT / "config" / "reference.yaml")
    config["datasets"]["la"]["train_by_method"]["uamt"] = {"iterations": 5}
    with pytest.raises(ConfigError, match=r"train_by_method\.uamt: 'uamt' is not a registered"):
        check_config(config)


@pytest.mark.parametrize("method", ["dtc", "sassnet"])
def test_a_3d_only_method_needs_skip_methods_on_a_2d_dataset(method):
    from agcl.config.checks import check_config
    from agcl.config.recipe import resolve_recipe

    config = load_config(PAPER)
    assert method in config["methods"]
    others = [m for m in ("dtc", "sassnet") if m != method]
    for dataset in ("acdc", "crag"):
        config["datasets"][dataset]["skip_methods"] = others
    with pytest.raises(ConfigError, match=rf"methods: {method} cannot train on acdc \(.*3D only"
                                          rf".*add it to datasets.acdc.skip_methods"):
        check_config(config)
    with pytest.raises(ConfigError, match=f"{method} cannot train on crag .*3D only"):
        resolve_recipe(config, "crag", method)  # agcl train refuses it too
    for dataset in ("acdc", "crag"):
        config["datasets"][dataset]["skip_methods"] = [method, *others]
    check_config(config)
    assert {d for d, m, _, _ in expected_runs(config) if m == method} == {"la"}
    config["datasets"]["acdc"]["skip_methods"] = [method, *others, "supervised"]
    with pytest.raises(ConfigError, match="skip_methods: 'supervised' is roles.lower_bound"):
        check_config(config)
    config["datasets"]["acdc"]["skip_methods"] = [method, *others, "mean_teachr"]
    with pytest.raises(ConfigError, match="skip_methods: 'mean_teachr' is not a registered method"):
        check_config(config)


def test_cpu_study_is_acdc_every_method_between_the_bounds():
    from agcl.data.specs import SPECS
    from agcl.methods.registry import get_method

    config = load_config(REPO_ROOT / "config" / "cpu_study.yaml")
    paper_grid = load_config(REPO_ROOT / "config" / "config.yaml")
    # at least 8 seeds: the seed is the unit of the statistics (a sign-flip test needs >= 6)
    assert list(config["datasets"]) == ["acdc"] and config["seeds"] == list(range(8))
    # every method of the paper grid (the repository's methods; a plugin a user drops into
    # baselines/ is not the study's business), bcp included; the 3D-only methods (dtc, sassnet)
    # cannot train on ACDC
    assert set(config["methods"]) == {m for m in paper_grid["methods"]
                                      if not get_method(m).unsupported(SPECS["acdc"])}
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


# --- roles: the lower bound and the method of interest come from the config ---

def test_roles_default_to_supervised_and_semi_agcl():
    from agcl.config import comparison_references, roles_of

    demo = load_config(DEMO)
    assert demo["roles"] == {"lower_bound": "supervised", "method_of_interest": "semi_agcl"}
    assert roles_of(demo) == demo["roles"]
    assert comparison_references(demo) == comparison_references() == ("semi_agcl", "supervised")


def test_the_lower_bound_role_decides_the_100_percent_runs():
    config = raw(DEMO)  # full_supervision: true
    config["roles"] = {"lower_bound": "mean_teacher"}
    config = validate_config(config, "demo.yaml")
    assert config["roles"] == {"lower_bound": "mean_teacher", "method_of_interest": "semi_agcl"}
    full = {(d, m) for d, m, r, _ in expected_runs(config) if r == "1"}
    assert full == {(d, "mean_teacher") for d in config["datasets"]}
    default = {(d, m) for d, m, r, _ in expected_runs(load_config(DEMO)) if r == "1"}
    assert default == {(d, "supervised") for d in config["datasets"]}


@pytest.mark.parametrize("role", ["lower_bound", "method_of_interest"])
def test_a_role_naming_a_method_outside_the_grid_is_refused(role):
    config = raw(DEMO)
    config["roles"] = {role: "nope"}
    with pytest.raises(ConfigError, match=(
            rf"demo.yaml: roles\.{role}: 'nope' is not in methods \(supervised, mean_teacher, "
            r"ua_mt, mc_net, bcp, semi_agcl\)")):
        validate_config(config, "demo.yaml")
    config = raw(DEMO)  # a noise twin is not a method of the grid either
    config["roles"] = {role: "supervised_ulp"}
    with pytest.raises(ConfigError, match=rf"roles\.{role}: 'supervised_ulp' is not in methods"):
        validate_config(config, "demo.yaml")


def test_default_roles_absent_from_the_grid():
    from agcl.config import comparison_references

    # no supervised run (the ablations): no lower bound, no 100 % runs, no comparisons with it
    config = {**raw(DEMO), "methods": ["semi_agcl", "bcp"], "full_supervision": False,
              "noise_floor": {}}
    config = validate_config(config)
    assert config["roles"] == {"lower_bound": None, "method_of_interest": "semi_agcl"}
    assert not [r for r in expected_runs(config) if r[2] == "1"]
    assert comparison_references(config) == ("semi_agcl",)
    # ... and full supervision without a lower bound is refused, naming the role
    with pytest.raises(ConfigError, match=r"full_supervision: true trains the lower bound .*"
                                          r"\(its default 'supervised' is not in methods\); .* "
                                          r"roles\.lower_bound, or set full_supervision: false"):
        validate_config({**raw(DEMO), "methods": ["semi_agcl", "bcp"], "noise_floor": {}})
    with pytest.raises(ConfigError, match=r"roles\.lower_bound is null"):
        validate_config({**raw(DEMO), "roles": {"lower_bound": None}})
    # no semi_agcl: the first method is the method of interest
    config = validate_config({**raw(DEMO), "methods": ["bcp", "supervised"]})
    assert config["roles"] == {"lower_bound": "supervised", "method_of_interest": "bcp"}
    assert comparison_references(config) == ("bcp", "supervised")


def test_resolved_roles_validate_again_unchanged(tmp_path):
    # the merged config Snakemake writes for the jobs holds the resolved roles
    config = validate_config({**raw(DEMO), "methods": ["semi_agcl", "bcp"],
                              "full_supervision": False, "noise_floor": {}})
    again = tmp_path / "merged.yaml"
    again.write_text(yaml.safe_dump(config))
    assert load_config(again)["roles"] == config["roles"]


def test_an_eval_stride_wider_than_the_window_is_refused():
    """A stride larger than the window leaves voxels no window covers (predicted background)."""
    config = raw(DEMO)
    patch = config["datasets"]["la"]["eval"].get("patch", config["datasets"]["la"]["train"]["patch"])
    config["datasets"]["la"]["eval"]["stride"] = [patch[0] + 1, *patch[1:]]
    with pytest.raises(ConfigError, match=r"datasets\.la\.eval\.stride .* exceeds the window"):
        validate_config(config, "demo.yaml")
    config["datasets"]["la"]["eval"]["stride"] = [1, 1]  # a 2D stride for a 3D window
    with pytest.raises(ConfigError, match=r"datasets\.la\.eval\.stride \[1, 1\]: expected 3"):
        validate_config(config, "demo.yaml")
    config["datasets"]["la"]["eval"]["stride"] = list(patch)  # no overlap: fine
    validate_config(config, "demo.yaml")


def test_eval_by_method_scores_each_method_as_its_test_script():
    """reference.yaml: on LA, SS-Net's, DTC's, BCP's and AD-MT's test scripts keep the largest
    connected component (--nms 1 by default), UA-MT's, MC-Net's and SASSNet's do not; a twin and a variant
    take their method's entry; an unknown name is refused."""
    from agcl.config import method_eval_config
    from agcl.config.checks import check_config

    reference = load_config(REPO_ROOT / "config" / "reference.yaml")
    keeps = {m for m in reference["methods"]
             if method_eval_config(reference, "la", m)["largest_component"]}
    assert keeps == {"ss_net", "dtc", "bcp", "ad_mt"}
    assert not any(method_eval_config(reference, "acdc", m)["largest_component"]
                   for m in reference["methods"])
    reference["noise_floor"] = {"methods": ["bcp"]}
    reference["variants"] = {"dtc_b": {"method": "dtc", "hparams": {}}}
    assert method_eval_config(reference, "la", "bcp_ulp")["largest_component"]
    assert method_eval_config(reference, "la", "dtc_b")["largest_component"]
    config = raw(DEMO)
    config["datasets"]["la"]["eval_by_method"] = {"ss_nte": {"largest_component": True}}
    with pytest.raises(ConfigError, match=r"datasets\.la\.eval_by_method\.ss_nte: 'ss_nte' is "
                                          "not a registered method"):
        check_config(validate_config(config, "demo.yaml"), "demo.yaml")
    config["datasets"]["la"]["eval_by_method"] = {"ss_net": {"stride": [1, 1, 1]}}
    with pytest.raises(ConfigError, match="eval_by_method.ss_net"):
        validate_config(config, "demo.yaml")


# method -> (its LA reference script, its 2D (ACDC) reference script), repository and path
RAMP_SCRIPTS = {
    "mean_teacher": (("yulequan/UA-MT", "train_LA_meanteacher_certainty_unlabel.py"),
                     ("HiLab-git/SSL4MIS", "train_mean_teacher_2D.py")),
    "ua_mt": (("yulequan/UA-MT", "train_LA_meanteacher_certainty_unlabel.py"),
              ("HiLab-git/SSL4MIS", "train_uncertainty_aware_mean_teacher_2D.py")),
    "mc_net": (("ycwu1997/MC-Net", "train_mcnet_3d.py"), ("ycwu1997/MC-Net", "train_mcnet_2d.py")),
    "ss_net": (("ycwu1997/SS-Net", "train_ss_3d.py"), ("ycwu1997/SS-Net", "train_ss_2d.py")),
    "dtc": (("HiLab-git/DTC", "train_la_dtc.py"), None),
    "sassnet": (("kleinzcy/SASSnet", "train_gan_sdfloss.py"), None),
    "urpc": (("HiLab-git/SSL4MIS", "train_uncertainty_rectified_pyramid_consistency_3D.py"),
             ("HiLab-git/SSL4MIS", "train_uncertainty_rectified_pyramid_consistency_2D.py")),
}


def reference_ramp_fraction(repo: str, script: str) -> float:
    """consistency_rampup x 150 / max_iterations, from the script's argparse defaults and its
    get_current_consistency_weight(iter_num // 150) line."""
    import re

    from tests.reference_code import reference_source

    text = reference_source(repo, script)

    def default(name):
        return float(re.search(rf"'--{name}'.*?default=\s*([0-9.]+)", text, re.DOTALL).group(1))

    assert "get_current_consistency_weight(iter_num//150)" in text.replace(" ", "")
    iterations = default("max_iterations") if "'--max_iterations'" in text \
        else default("max_iteration")
    return default("consistency_rampup") * 150 / iterations


@pytest.mark.parametrize("method", sorted(RAMP_SCRIPTS))
def test_unified_ramps_span_the_share_of_the_run_their_reference_does(method):
    """config.yaml's one rule for consistency ramps: each spans the same fraction of the run as
    in the method's reference script (LA: its 3D script; ACDC and CRAG: its 2D script)."""
    from agcl.config.recipe import resolve_recipe

    paper = load_config(PAPER)
    for dataset, dcfg in paper["datasets"].items():
        if method in dcfg.get("skip_methods", []):
            continue
        script = RAMP_SCRIPTS[method][0 if dataset == "la" else 1]
        hparams = resolve_recipe(paper, dataset, method).hparams
        ours = (hparams["consistency_rampup"] * hparams["rampup_epoch_iterations"]
                / dcfg["train"]["iterations"])
        assert ours == pytest.approx(reference_ramp_fraction(*script)), (dataset, script)


def test_sassnets_consistency_per_label_count_is_its_readmes():
    """reference.yaml trains SASSNet on LA with the consistency its README gives each label
    count (read from the README): 0.015 for 8 labels (10 %); 5 % keeps the argparse 0.01."""
    import re

    from agcl.config.recipe import resolve_recipe
    from tests.reference_code import REFERENCE_SNAPSHOTS, snapshot

    archive = snapshot("kleinzcy/SASSnet")
    if archive is None:
        pytest.skip(f"no SASSnet snapshot under {REFERENCE_SNAPSHOTS}")
    import tarfile

    with tarfile.open(archive) as tar:
        readme = tar.extractfile("README.md").read().decode()
    by_labels = {int(n): float(c) for n, c in
                 re.findall(r"--label (\d+) --consistency ([0-9.]+)", readme)}
    assert by_labels == {16: 0.01, 8: 0.015}
    reference = load_config(REPO_ROOT / "config" / "reference.yaml")
    # LA: 80 training scans, so 10 % is 8 labels
    assert resolve_recipe(reference, "la", "sassnet", ratio=0.1).hparams["consistency"] == \
        by_labels[8]
    assert resolve_recipe(reference, "la", "sassnet", ratio=0.05).hparams["consistency"] == 0.01
    config = raw(DEMO)
    config["datasets"]["la"]["hparams_by_ratio"] = {"0.1x": {}}
    with pytest.raises(ConfigError, match="hparams_by_ratio"):
        validate_config(config, "demo.yaml")


def test_reference_yaml_is_an_overlay_holding_only_what_differs_from_config_yaml():
    import yaml

    raw = yaml.safe_load((REPO_ROOT / "config" / "reference.yaml").read_text())
    assert raw.pop("extends") == "config.yaml"
    base = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())

    def same_leaves(overlay, under, path=""):
        for key, value in overlay.items():
            here = f"{path}.{key}" if path else key
            if isinstance(value, dict) and isinstance(under.get(key), dict):
                yield from same_leaves(value, under[key], here)
            elif key in under and under[key] == value:
                yield here

    assert list(same_leaves(raw, base)) == []
    config = load_config(REPO_ROOT / "config" / "reference.yaml")
    assert config["name"] == "reference" and config["seeds"] == base["seeds"]
    assert "extends" not in config


def test_a_broken_extends_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="extends: a.yaml extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: extends: .*missing.yaml is not a file"):
        load_config(tmp_path / "c.yaml")


def test_method_defaults_are_keyed_by_what_differs_so_a_new_dataset_needs_no_method_edit():
    from agcl.data.specs import SPECS
    from agcl.methods.base import default_kinds
    from agcl.methods.registry import get_method

    assert default_kinds(SPECS["la"]) == ["3d", "la"]
    assert default_kinds(SPECS["acdc"]) == ["2d", "multiclass", "acdc"]
    assert default_kinds(SPECS["crag"]) == ["2d", "crag"]
    paper_grid = load_config(REPO_ROOT / "config" / "config.yaml")
    for name in paper_grid["methods"]:
        keys = set(get_method(name).dataset_defaults)
        assert keys <= {"2d", "3d", "multiclass"}, (name, keys)
