"""Method variants (config `variants`): a registered method with some hyperparameters changed,
trained, evaluated and reported under its own name (the ablations of config/ablations.yaml)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml

from agcl.config import ConfigError, load_config, validate_config
from agcl.config.checks import check_config
from agcl.engine.trainer import Trainer
from agcl.runtime.runfolder import FINAL
from tests.conftest import tiny_config
from tests.test_pipeline import prepare, run_cli

GK_L1 = {"semi_agcl_gk_l1": {"method": "semi_agcl", "hparams": {"kernel": "gk_l1"}}}


def test_a_variant_trains_as_its_method_with_its_hparams(tiny_project):
    config = yaml.safe_load(tiny_project.read_text())
    config.update(methods=["semi_agcl", "semi_agcl_gk_l1"], variants=GK_L1,
                  hparams={"semi_agcl": {"pretrain_iterations": 2}})
    tiny_project.write_text(yaml.safe_dump(config))
    layout = prepare(tiny_project, "la")
    run = layout.run("la", "semi_agcl_gk_l1", 0.2, 0)
    run_cli("train", "la", "--config", tiny_project, "--method", "semi_agcl_gk_l1",
            "--labels", "0.2", "--seed", "0", "--no-progress")
    meta = json.loads((run / "run.json").read_text())
    assert (meta["method"], meta["base_method"]) == ("semi_agcl_gk_l1", "semi_agcl")
    assert meta["hparams"]["kernel"] == "gk_l1"
    assert meta["hparams"]["pretrain_iterations"] == 2  # the method's config hparams apply too
    run_cli("evaluate", "la", "--config", tiny_project, "--run", run)
    assert json.loads((run / "metrics.json").read_text())["method"] == "semi_agcl_gk_l1"
    # the same weights as the method itself trained with that hyperparameter changed
    Trainer(load_config(tiny_project), "la", "semi_agcl", 0.2, 0, tiny_project.parent / "same",
            overrides={"kernel": "gk_l1"}, progress=False).run()
    variant = torch.load(run / FINAL, weights_only=True)["state_dict"]
    direct = torch.load(tiny_project.parent / "same" / FINAL, weights_only=True)["state_dict"]
    assert all(torch.equal(variant[k], direct[k]) for k in direct)


@pytest.mark.parametrize("variants,methods,message", [
    ({"v": {"method": "nope"}}, ["v"], "variants.v.method: 'nope' is not a registered method"),
    ({"v": {"method": "semi_agcl", "hparams": {"kernal": "gk_l1"}}}, ["v"],
     "variants.v.hparams: method 'semi_agcl' has no hyperparameter kernal"),
    ({"bcp": {"method": "semi_agcl"}}, ["bcp"], "variants.bcp: the name of a registered method"),
    (GK_L1, ["semi_agcl_gk_l2"],
     "methods[0]: 'semi_agcl_gk_l2' is not a registered method or a variant"),
])
def test_bad_variants_are_named(variants, methods, message):
    config = validate_config({**copy.deepcopy(tiny_config()), "variants": variants,
                              "methods": methods})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(config, source="test.yaml")


def test_a_variant_needs_its_method():
    with pytest.raises(ConfigError, match=r"variants\.v.*'method' is a required property"):
        validate_config({**tiny_config(), "variants": {"v": {"hparams": {}}}})
