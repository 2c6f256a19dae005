"""The run folder's rules: identity, --force, atomic "finished", temporaries, non-finite steps,
failed writes, and what evaluation and aggregation accept. Each test is a probe from issue 7."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from agcl.cli import main
from agcl.config import ConfigError, load_config
from agcl.engine import trainer as trainer_module
from agcl.engine.trainer import Trainer
from agcl.engine.update import NonFiniteError
from agcl.eval.evaluate import evaluate_run
from agcl.methods.registry import get_method
from agcl.report.aggregate import aggregate
from agcl.runtime import runfolder
from agcl.runtime.runfolder import (
    BEST,
    FINAL,
    LAST,
    LOG_CSV,
    METRICS_JSON,
    PREDICTIONS,
    RUN_JSON,
    RunFolder,
    RunMismatchError,
    UnfinishedRunError,
)
from tests.test_pipeline import prepare


def train_cli(config: Path, run: Path, *extra: str) -> int:
    return main(["train", "la", "--config", str(config), "--method", "supervised", "--labels",
                 "0.1", "--seed", "0", "--out", str(run), "--no-progress", *map(str, extra)])


def evaluate_cli(config: Path, run: Path, *extra: str) -> int:
    return main(["evaluate", "la", "--config", str(config), "--run", str(run), *extra])


def trainer(config_path: Path, run: Path, seed: int = 0, **kwargs) -> Trainer:
    return Trainer(load_config(config_path), "la", "supervised", 0.1, seed, run, progress=False,
                   **kwargs)


class Killed(BaseException):
    """Stands in for SIGKILL inside the process (not an Exception: nothing may catch it)."""


@contextlib.contextmanager
def killed_at_step(monkeypatch, step_number: int):
    """Make the trainer die when it starts step `step_number` (1-based)."""
    original = trainer_module.Trainer._step

    def step(self, *args):
        state = args[-1]
        if state.step + 1 == step_number:
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(trainer_module.Trainer, "_step", step)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(trainer_module.Trainer, "_step", original)


def finished_weights(run: Path) -> dict:
    return torch.load(run / FINAL, weights_only=True)["state_dict"]


@pytest.fixture
def la_project(tiny_project):
    prepare(tiny_project, "la", seeds=(0, 1))
    return tiny_project


# --- --force and validation order -----------------------------------------------------------
@pytest.mark.parametrize("bad", [["--method", "supervsed"], ["--set", "no_such_hparam=1"],
                                 ["--set", "train.no_such_key=1"]])
def test_force_with_a_bad_argument_keeps_the_finished_run(la_project, bad, capsys):
    run = Path("runs/a")
    assert train_cli(la_project, run) == 0
    assert evaluate_cli(la_project, run) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = ["train", "la", "--config", str(la_project), "--method", "supervised", "--labels", "0.1",
            "--seed", "0", "--out", str(run), "--no-progress", "--force", *bad]
    assert main(args) == 1
    assert "error:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_forced_retrain_removes_every_derived_file(la_project, monkeypatch):
    run = Path("results/tiny/runs/la/supervised/r0.1/s0")  # the grid's folder for this run
    assert train_cli(la_project, run) == 0
    assert evaluate_cli(la_project, run, "--save-predictions") == 0
    assert (run / METRICS_JSON).exists() and (run / PREDICTIONS).exists()
    with killed_at_step(monkeypatch, 3):  # the forced retrain dies half-way
        trainer(la_project, run, force=True).run()
    assert (run / LAST).exists()
    assert not any((run / n).exists() for n in (FINAL, RUN_JSON, METRICS_JSON, PREDICTIONS))
    aggregate(load_config(la_project))
    assert pd.read_csv(Path("results/tiny/summary/runs.csv")).empty
    missing = pd.read_csv(Path("results/tiny/summary/missing.csv"))
    row = missing[(missing.dataset == "la") & (missing.seed == 0) & (missing.ratio == 0.1)]
    assert list(row["reason"]) == ["not evaluated (no metrics.json)"]


def test_metrics_of_another_model_are_not_counted(la_project):
    config = load_config(la_project)
    run = Path("results/tiny/runs/la/supervised/r0.1/s0")
    trainer(la_project, run).run()
    evaluate_run(config, "la", run)
    assert RunFolder(run).evaluated()[0] is not None
    metrics = json.loads((run / METRICS_JSON).read_text())
    (run / METRICS_JSON).write_text(json.dumps({**metrics, "run_id": "some-older-model"}))
    aggregate(config)
    missing = pd.read_csv(Path("results/tiny/summary/missing.csv"))
    reason = missing[(missing.dataset == "la") & (missing.ratio == 0.1) & (missing.seed == 0)
                     ]["reason"].iloc[0]
    assert "belongs to another model" in reason
    assert pd.read_csv(Path("results/tiny/summary/runs.csv")).empty


# --- resume identity ------------------------------------------------------------------------
def test_resume_under_another_seed_is_refused(la_project, monkeypatch):
    run = Path("runs/a")
    with killed_at_step(monkeypatch, 3):
        trainer(la_project, run, seed=0).run()
    assert (run / LAST).exists()
    with pytest.raises(RunMismatchError, match=r"seed is 0 in the checkpoint but 1 here"):
        trainer(la_project, run, seed=1).run()
    assert (run / LAST).exists() and not (run / FINAL).exists()


def test_resume_with_other_settings_names_them(la_project, monkeypatch):
    run = Path("runs/a")
    with killed_at_step(monkeypatch, 3):
        trainer(la_project, run).run()
    with pytest.raises(RunMismatchError, match=r"train\.lr: 0\.01 -> 0\.02"):
        trainer(la_project, run, overrides={"train.lr": 0.02}).run()
    # logging-only keys do not change the run: the resume goes through
    meta = trainer(la_project, run, overrides={"train.log_every": 2}).run()
    assert meta["resumed_at_steps"] == [2]


def test_resume_on_another_split_is_refused(la_project, monkeypatch):
    """The run identity holds a hash of its split and processed data: a run killed at step 3
    does not resume on a split made afresh with other val cases."""
    from agcl.config import Layout

    run = Path("runs/a")
    with killed_at_step(monkeypatch, 3):
        trainer(la_project, run).run()
    config = load_config(la_project)
    split_path = Layout(config).splits("la", 0)
    split = json.loads(split_path.read_text())
    moved = split["test"].pop()  # a case moves from test to val: another split
    split["val"].append(moved)
    split_path.write_text(json.dumps(split))
    with pytest.raises(RunMismatchError, match="the data differ"):
        trainer(la_project, run).run()
    assert (run / LAST).exists() and not (run / FINAL).exists()


def test_train_seconds_add_up_over_resumed_segments(la_project, monkeypatch):
    run = Path("runs/a")
    with killed_at_step(monkeypatch, 3):
        trainer(la_project, run).run()
    first_segment = torch.load(run / LAST, weights_only=True)["state"]["train_seconds"]
    assert first_segment > 0
    # The resumed segment runs on a clock that barely moves: all it can add is ~microseconds,
    # so a total near first_segment proves the first segment was counted.
    clock = iter(range(100_000))
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: 1e-9 * next(clock))
    meta = trainer(la_project, run).run()
    assert first_segment <= meta["train_seconds"] < first_segment + 1e-3
    assert meta["resumed_at_steps"] == [2]


# --- "finished" is one atomic fact ----------------------------------------------------------
def test_kill_between_final_checkpoint_and_run_json_still_evaluates(la_project, monkeypatch):
    run = Path("runs/a")
    original = trainer_module.write_json

    def dies_before_run_json(path, obj):
        if Path(path).name == RUN_JSON:
            raise Killed
        return original(path, obj)

    monkeypatch.setattr(trainer_module, "write_json", dies_before_run_json)
    with pytest.raises(Killed):
        trainer(la_project, run).run()
    monkeypatch.setattr(trainer_module, "write_json", original)
    assert (run / FINAL).exists() and not (run / RUN_JSON).exists()
    summary = evaluate_run(load_config(la_project), "la", run)
    meta = json.loads((run / RUN_JSON).read_text())  # restored from ckpt_final.pt
    assert summary["run_id"] == meta["run_id"] and meta["seed"] == 0
    assert RunFolder(run).evaluated()[0] is not None


def test_orphaned_temporaries_are_removed(la_project):
    run = Path("runs/a")
    run.mkdir(parents=True)
    orphan = run / ".ckpt_last.pt.k2j4h5.tmp"
    orphan.write_bytes(b"\0" * 1024)
    trainer(la_project, run).run()
    assert not orphan.exists()
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_iterations_must_be_positive(la_project, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli(la_project, Path("runs/a"), "--iterations", value)
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
    assert not Path("runs/a").exists()


def test_trainer_refuses_non_positive_iterations(la_project):
    with pytest.raises(ValueError, match="--iterations must be a positive integer, got 0"):
        trainer(la_project, Path("runs/a"), iterations=0)


# --- non-finite steps -----------------------------------------------------------------------
class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients (the CPU bug)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def poison_steps(monkeypatch, steps: set[int]) -> None:
    """Supervised training whose gradients are NaN at the given 0-based steps."""
    cls = get_method("supervised")
    original = cls.train_step

    def train_step(self, batch, step):
        loss, logs = original(self, batch, step)
        if step in steps:
            weight = next(self.student.parameters())
            loss = loss + 0.0 * _NanGradient.apply(weight).sum()
        return loss, logs

    monkeypatch.setattr(cls, "train_step", train_step)


def test_non_finite_gradient_step_is_skipped_and_recorded(la_project, monkeypatch, caplog):
    clean = trainer(la_project, Path("runs/clean"), iterations=2).run()
    poison_steps(monkeypatch, {2})
    meta = trainer(la_project, Path("runs/skip")).run()
    assert meta["skipped_steps"] == 1 and meta["skipped_step_numbers"] == [3]
    assert "step 3: the gradient of student." in caplog.text and "step skipped" in caplog.text
    log = pd.read_csv(Path("runs/skip") / LOG_CSV)
    assert list(log["skipped"]) == [0, 0, 1, 0]
    for value in finished_weights(Path("runs/skip")).values():
        assert torch.isfinite(value.float()).all()
    assert clean["skipped_steps"] == 0


def test_skipped_step_leaves_the_weights_unchanged(la_project, monkeypatch):
    trainer(la_project, Path("runs/two"), iterations=2).run()
    poison_steps(monkeypatch, {2})
    trainer(la_project, Path("runs/three"), iterations=3).run()
    two, three = finished_weights(Path("runs/two")), finished_weights(Path("runs/three"))
    for key, value in two.items():
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm statistics follow the forward pass, as with any skipped step
        assert torch.equal(value, three[key]), key


def test_stop_policy_names_the_step_and_the_parameter(la_project, monkeypatch):
    poison_steps(monkeypatch, {1})
    with pytest.raises(NonFiniteError, match=r"step 2: the gradient of student\.\S+ is not finite"):
        trainer(la_project, Path("runs/stop"), overrides={"train.nonfinite": "stop"}).run()
    assert not (Path("runs/stop") / FINAL).exists()


def test_too_many_skips_in_a_row_stop_the_run(la_project, monkeypatch):
    poison_steps(monkeypatch, {0, 1, 2, 3})
    with pytest.raises(NonFiniteError, match=r"3 steps in a row skipped"):
        trainer(la_project, Path("runs/many"), overrides={"train.max_consecutive_skips": 3}).run()


# --- messages a user can act on -------------------------------------------------------------
def test_disk_full_while_saving_a_checkpoint_is_one_clear_line(la_project, monkeypatch, capsys):
    @contextlib.contextmanager
    def full_disk(path):
        yield Path("/dev/full")  # every write there fails with ENOSPC, as a full disk does

    monkeypatch.setattr(runfolder, "atomic_path", full_disk)
    assert train_cli(la_project, Path("runs/full")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cannot write checkpoint runs/full/ckpt_last.pt: the disk is full" in err
    assert "run the same command again" in err and "inline_container" not in err


def test_evaluating_an_unfinished_run_says_how_to_resume(la_project, monkeypatch, capsys):
    run = Path("runs/a")
    with killed_at_step(monkeypatch, 3):
        trainer(la_project, run).run()
    assert evaluate_cli(la_project, run) == 1
    err = capsys.readouterr().err
    assert "is unfinished (no ckpt_final.pt; its last checkpoint is at step 2)" in err
    assert "run the same `agcl train` command again to resume it" in err
    with pytest.raises(UnfinishedRunError):
        evaluate_run(load_config(la_project), "la", Path("runs/nothing"))


def test_evaluating_with_the_wrong_dataset_is_refused(la_project, capsys):
    run = Path("runs/a")
    assert train_cli(la_project, run) == 0
    assert main(["evaluate", "acdc", "--config", str(la_project), "--run", str(run)]) == 1
    assert "holds a la run but it is being evaluated as acdc" in capsys.readouterr().err


def test_best_val_checkpoint_must_belong_to_the_run(tiny_project):
    prepare(tiny_project, "acdc")
    config = load_config(tiny_project)
    run = Path("runs/acdc")
    Trainer(config, "acdc", "supervised", 0.1, 0, run, progress=False).run()
    best = torch.load(run / BEST, weights_only=True)
    torch.save({**best, "run_id": "another"}, run / BEST)
    with pytest.raises(runfolder.RunFolderError, match="belongs to another training"):
        evaluate_run(config, "acdc", run)


def test_default_run_folder_is_the_configs(la_project):
    assert main(["train", "la", "--config", str(la_project), "--method", "supervised",
                 "--labels", "0.1", "--seed", "1", "--no-progress"]) == 0
    run = Path("results/tiny/runs/la/supervised/r0.1/s1")
    assert (run / FINAL).exists()
    assert main(["evaluate", "la", "--config", str(la_project), "--method", "supervised",
                 "--labels", "0.1", "--seed", "1"]) == 0
    assert RunFolder(run).evaluated()[0] is not None


def test_unknown_net_option_names_the_config_key(la_project):
    config = load_config(la_project)
    config["datasets"]["la"]["net"] = {"n_filter": 2}
    with pytest.raises(ConfigError, match=r"datasets\.la\.net: net 'vnet' has no option n_filter"):
        Trainer(config, "la", "supervised", 0.1, 0, Path("runs/a"))


def test_a_second_trainer_in_the_same_folder_is_refused(la_project):
    run = Path("runs/a")
    with RunFolder(run).lock(), pytest.raises(runfolder.RunBusyError,
                                              match="another `agcl train` is working in"):
        trainer(la_project, run).run()
    trainer(la_project, run).run()  # the lock is released with its holder


class _Planted:
    """A pickle that runs code when unpickled: it creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", [FINAL, LAST])
def test_a_planted_checkpoint_is_refused_without_running_its_code(tmp_path, name):
    """Checkpoints load with torch.load(weights_only=True): a file that would run code on
    unpickling (on evaluate, on resume, or while the unfinished-run message reads its step) is
    refused and its code never runs."""
    from agcl.runtime.runfolder import RunFolder, RunFolderError

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"state": {"step": _Planted(marker)}, "state_dict": {}, "run": {}}, run / name)
    folder = RunFolder(run)
    with pytest.raises(RunFolderError, match="cannot read this checkpoint"):
        folder.load_checkpoint(name)
    assert folder.last_checkpoint_step() is None
    folder.unfinished_message()
    assert not marker.exists()


def test_out_into_a_non_empty_folder_that_is_not_a_run_is_refused(la_project, capsys):
    """A user's folder with a metrics.json and a tensorboard/ of their own: training there
    would remove them; it is refused without --force and nothing is touched."""
    folder = Path("mine")
    (folder / "tensorboard").mkdir(parents=True)
    (folder / METRICS_JSON).write_text('{"mine": true}')
    (folder / "tensorboard" / "events").write_text("x")
    assert train_cli(la_project, folder) == 1
    err = capsys.readouterr().err
    assert "mine is not empty and holds no run (metrics.json, tensorboard)" in err
    assert "--force" in err
    assert (folder / METRICS_JSON).read_text() == '{"mine": true}'
    assert (folder / "tensorboard" / "events").exists()
    # an empty folder (as Snakemake may create) trains
    Path("empty").mkdir()
    assert train_cli(la_project, Path("empty")) == 0


def test_evaluate_applies_the_methods_own_eval_entry(la_project):
    """datasets.<d>.eval_by_method reaches agcl evaluate: the run's metrics.json records the
    largest-component step its method's entry asks for."""
    import yaml

    run = Path("runs/a")
    assert train_cli(la_project, run) == 0
    config = yaml.safe_load(la_project.read_text())
    config["datasets"]["la"]["eval_by_method"] = {"supervised": {"largest_component": True}}
    by_method = la_project.parent / "by_method.yaml"
    by_method.write_text(yaml.safe_dump(config))
    assert evaluate_cli(by_method, run) == 0
    assert json.loads((run / METRICS_JSON).read_text())["protocol"]["largest_component"] is True
    assert evaluate_cli(la_project, run) == 0
    assert json.loads((run / METRICS_JSON).read_text())["protocol"]["largest_component"] is False


def test_hyperparameters_by_labeled_fraction_reach_the_run(la_project):
    """datasets.<d>.hparams_by_ratio: one labeled fraction's runs train with their own value,
    the others with the dataset's; the settings hash (the DAG's rerun trigger) follows."""
    import yaml

    config = yaml.safe_load(la_project.read_text())
    config["datasets"]["la"]["hparams_by_ratio"] = {"0.1": {"supervised": {"dice_form": "linear"}}}
    path = la_project.parent / "by_ratio.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    at_10 = Trainer(loaded, "la", "supervised", 0.1, 0, Path("runs/r10"), progress=False)
    at_20 = Trainer(loaded, "la", "supervised", 0.2, 0, Path("runs/r20"), progress=False)
    at_10, at_20 = at_10.description, at_20.description
    assert (at_10.hparams["dice_form"], at_20.hparams["dice_form"]) == ("linear", "squared")
    assert at_10.identity["settings_hash"] != at_20.identity["settings_hash"]
    config["datasets"]["la"]["hparams_by_ratio"] = {"0.1": {"supervised": {"dice_from": "x"}}}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"datasets\.la\.hparams_by_ratio\.0\.1\.supervised"):
        Trainer(load_config(path), "la", "supervised", 0.1, 0, Path("runs/bad"), progress=False)
