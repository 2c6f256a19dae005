"""What a plugin gets wrong is named where it happened, and nothing about a run is hidden in the
outputs: an exception carries method, stage, step, file and line; a net left in eval mode is
named; unread hyperparameters are reported; skipped steps reach the final line, runs.csv and the
report; a failed run's error line and log reach missing.csv and the report; a smoke run says so."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import yaml

from agcl.cli import main
from agcl.config import Layout, load_config
from agcl.methods import registry
from tests.test_pipeline import prepare

PLUGIN = '''
import torch

from agcl.methods import Batch, HParam, Method, register_method
from agcl.methods.losses import SUPERVISED_LOSS_HPARAMS, supervised_loss


@register_method("guard_probe")
class GuardProbe(Method):
    uses_unlabeled = False
    hyperparameters = {**SUPERVISED_LOSS_HPARAMS, "mode": HParam("ok", choices=("ok", "raise",
                       "nan", "eval")), "never_used": HParam(1.0)}

    def train_step(self, batch: Batch, step: int):
        mode = self.hparams["mode"]
        logits = self.student(batch.x_labeled)
        losses = supervised_loss(logits, batch.y_labeled, self.hparams["dice_include_background"],
                                 self.hparams["dice_form"])
        if mode == "raise" and step == 2:
            raise ValueError("shapes do not match")  # GUARD_LINE
        if mode == "eval":
            self.student.eval()
        loss = losses["loss_sup"]
        if mode == "nan" and step in (1, 3):
            loss = loss * float("nan")
        return loss, {}
'''
GUARD_LINE = next(i for i, line in enumerate(PLUGIN.splitlines(), 1) if "GUARD_LINE" in line)


@pytest.fixture
def project(tiny_project, monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry.registered()))
    monkeypatch.setattr(registry, "_LOADED_DIRS", list(registry._LOADED_DIRS))
    folder = tiny_project.parent.parent / "plugins"
    folder.mkdir()
    (folder / "guard_probe.py").write_text(PLUGIN)
    config = yaml.safe_load(tiny_project.read_text())
    config.update(plugin_dirs=[str(folder)], methods=["guard_probe"], seeds=[0], ratios=[0.1],
                  full_supervision=False, noise_floor={"methods": []}, run_datasets=["la"])
    config["datasets"]["la"]["train"]["iterations"] = 6
    tiny_project.write_text(yaml.safe_dump(config))
    prepare(tiny_project, "la")
    yield tiny_project
    sys.modules.pop(f"{registry.PLUGIN_PACKAGE}.guard_probe", None)


def train(project, mode):
    config = yaml.safe_load(project.read_text())
    project.write_text(yaml.safe_dump({**config, "hparams": {"guard_probe": {"mode": mode}}}))
    layout = Layout(load_config(project))
    status = main(["train", "la", "--config", str(project), "--method", "guard_probe",
                   "--labels", "0.1", "--seed", "0", "--no-progress"])
    return status, layout.run("la", "guard_probe", 0.1, 0)


def test_an_exception_in_train_step_names_method_stage_step_file_and_line(project, capsys):
    status, _ = train(project, "raise")
    err = capsys.readouterr().err
    assert status == 1
    assert "la/guard_probe r0.1 s0, stage main, step 3" in err
    assert "method 'guard_probe' raised in train_step: ValueError: shapes do not match" in err
    assert f"guard_probe.py:{GUARD_LINE} in train_step" in err and "--debug" in err


def test_a_trained_net_left_in_eval_mode_is_named(project, capsys):
    status, _ = train(project, "eval")
    err = capsys.readouterr().err
    assert status == 1 and "student" in err and "is in eval mode after the step" in err


def test_skipped_steps_and_unread_hparams_are_in_the_final_line_run_json_runs_csv_and_report(
        project, capsys, caplog):
    status, run = train(project, "nan")
    captured = capsys.readouterr()
    assert status == 0
    assert "6 iterations" in captured.out and "2 of them SKIPPED as non-finite (steps 2, 4" \
        in captured.out
    meta = json.loads((run / "run.json").read_text())
    assert meta["skipped_steps"] == 2
    # "never_used" is declared and read by nothing; "mode" is read every step
    assert meta["unread_hparams"] == ["never_used"]
    assert "never read in this run: never_used" in caplog.text
    assert main(["evaluate", "la", "--config", str(project), "--run", str(run)]) == 0
    assert main(["aggregate", "--config", str(project)]) == 0
    layout = Layout(load_config(project))
    runs = pd.read_csv(layout.results / "summary" / "runs.csv")
    assert list(runs["skipped_steps"]) == [2]
    assert list(runs["trained_parameters"]) == [meta["parameters"]]
    assert main(["report", "--config", str(project)]) == 0
    page = (layout.report / "index.html").read_text()
    assert 'id="skipped-steps-warning"' in page and "seed 0: 2 step(s)" in page
    assert 'id="smoke-banner"' not in page


def test_a_failed_run_names_its_error_and_log_in_missing_csv_and_the_report(project, capsys):
    layout = Layout(load_config(project))
    log = layout.job_log("train", "la", "guard_probe", 0.1, 0)
    log.parent.mkdir(parents=True)
    status, _ = train(project, "raise")
    # what the workflow's train rule does with the job's output
    log.write_text(capsys.readouterr().err)
    assert status == 1
    assert main(["aggregate", "--config", str(project)]) == 0
    missing = pd.read_csv(layout.results / "summary" / "missing.csv")
    reason = missing.loc[0, "reason"]
    assert reason.startswith("train failed: agcl train: error: la/guard_probe r0.1 s0, stage main")
    assert f"(log: {log})" in reason and missing.loc[0, "log"] == str(log)
    assert main(["report", "--config", str(project)]) == 0
    assert "ValueError: shapes do not match" in (layout.report / "index.html").read_text()


def test_a_smoke_run_report_carries_a_banner(project):
    config = yaml.safe_load(project.read_text())
    project.write_text(yaml.safe_dump({**config, "smoke_steps": 2}))
    assert main(["aggregate", "--config", str(project)]) == 0
    assert main(["report", "--config", str(project)]) == 0
    page = (Layout(load_config(project)).report / "index.html").read_text()
    assert 'id="smoke-banner"' in page and "at most\n2 steps" in page
