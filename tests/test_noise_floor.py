"""Run-to-run twins (config `noise_floor`, its historical name): each named method is trained
again at every ratio and seed with its initial weights one ulp away, as the twin `<method>_ulp`."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml

from agcl.config import ConfigError, expected_runs, noise_twins, validate_config
from agcl.config.recipe import resolve_recipe
from agcl.engine.prepare import perturb_one_ulp
from agcl.engine.trainer import Trainer
from agcl.nets import build
from agcl.runtime.runfolder import FINAL
from tests.conftest import tiny_config
from tests.test_pipeline import prepare, run_cli


def noisy_config(**extra) -> dict:
    config = copy.deepcopy(tiny_config())
    config.update(methods=["supervised", "mean_teacher"], noise_floor={"methods": ["supervised"]},
                  **extra)
    return validate_config(config)


def test_twins_join_the_grid_at_every_ratio_and_seed_but_not_the_upper_bound():
    config = noisy_config(full_supervision=True)
    assert noise_twins(config) == {"supervised_ulp": "supervised"}
    runs = expected_runs(config)
    twin = sorted((r, s) for d, m, r, s in runs if d == "la" and m == "supervised_ulp")
    assert twin == [("0.1", 0), ("0.1", 1), ("0.2", 0), ("0.2", 1)]  # no 100 % twin
    assert ("la", "supervised", "1", 0) in runs
    assert not noise_twins(validate_config(copy.deepcopy(tiny_config())))


@pytest.mark.parametrize("noise_floor,message", [
    ({"methods": ["bcp"]}, "noise_floor.methods: 'bcp' is not in methods"),
    ({"methods": ["supervised"], "extra": 1}, "Additional properties are not allowed"),
])
def test_bad_noise_floor_is_named(noise_floor, message):
    config = {**copy.deepcopy(tiny_config()), "noise_floor": noise_floor}
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


def test_a_twin_name_that_is_taken_is_refused():
    config = {**copy.deepcopy(tiny_config()), "methods": ["supervised", "supervised_ulp"],
              "variants": {"supervised_ulp": {"method": "supervised"}},
              "noise_floor": {"methods": ["supervised"]}}
    with pytest.raises(ConfigError, match="twin name 'supervised_ulp' is already a method"):
        validate_config(config)


def test_the_twin_recipe_is_its_methods_plus_the_perturbation():
    config = noisy_config()
    base = resolve_recipe(config, "la", "supervised")
    twin = resolve_recipe(config, "la", "supervised_ulp")
    assert (twin.method_cls, twin.train_cfg, twin.hparams) == (base.method_cls, base.train_cfg,
                                                               base.hparams)
    assert twin.settings == {**base.settings, "init_perturbation": "ulp"}
    assert twin.settings_hash != base.settings_hash  # the twin never reuses the method's runs
    assert (twin.init_perturbation, twin.noise_floor_of) == ("ulp", "supervised")
    assert (base.init_perturbation, base.noise_floor_of) == (None, None)


def test_perturb_one_ulp_moves_every_float_parameter_by_exactly_one_ulp():
    torch.manual_seed(0)
    net = build("unet", 1, 4, base_features=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    perturb_one_ulp(net)
    after = net.state_dict()
    params = {name for name, _ in net.named_parameters()}
    for key, value in before.items():
        if key in params:
            assert torch.equal(after[key], torch.nextafter(value, torch.full_like(value, 1e30)))
            assert (after[key] > value).all()
            # one ulp: nothing lies strictly between the two float32 values
            assert torch.equal(torch.nextafter(after[key], torch.full_like(value, -1e30)), value)
        else:  # buffers (BatchNorm statistics, counters) are left as they are
            assert torch.equal(after[key], value)


def test_a_twin_trains_from_perturbed_weights_and_says_whose_twin_it_is(tiny_project):
    config = yaml.safe_load(tiny_project.read_text())
    config.update(noise_floor={"methods": ["supervised"]})
    tiny_project.write_text(yaml.safe_dump(config))
    layout = prepare(tiny_project, "la")
    for method in ("supervised", "supervised_ulp"):
        run_cli("train", "la", "--config", tiny_project, "--method", method, "--labels", "0.2",
                "--seed", "0", "--no-progress")
    twin_dir = layout.run("la", "supervised_ulp", 0.2, 0)
    meta = json.loads((twin_dir / "run.json").read_text())
    assert (meta["method"], meta["base_method"]) == ("supervised_ulp", "supervised")
    assert (meta["noise_floor_of"], meta["init_perturbation"]) == ("supervised", "ulp")
    base = json.loads((layout.run("la", "supervised", 0.2, 0) / "run.json").read_text())
    assert (base["noise_floor_of"], base["init_perturbation"]) == (None, None)
    twin = torch.load(twin_dir / FINAL, weights_only=False)["state_dict"]
    same = torch.load(layout.run("la", "supervised", 0.2, 0) / FINAL, weights_only=False)
    assert any(not torch.equal(twin[k], same["state_dict"][k]) for k in twin)
    run_cli("evaluate", "la", "--config", tiny_project, "--run", twin_dir)
    assert json.loads((twin_dir / "metrics.json").read_text())["method"] == "supervised_ulp"
    # the same perturbation, built by hand, starts from the same weights as the twin's run
    trainer = Trainer(validate_config(copy.deepcopy(config)), "la", "supervised_ulp", 0.2, 0,
                      tiny_project.parent / "again", progress=False)
    assert trainer.description.recipe.init_perturbation == "ulp"
