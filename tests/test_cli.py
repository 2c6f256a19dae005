"""The fixed command-line forms users script against."""

import subprocess
import sys

import pytest

from agcl.cli import build_parser, main

COMMANDS = ["download", "ingest-crag", "synth", "preprocess", "splits", "methods", "train",
            "evaluate", "aggregate", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_console_entry_point_runs_as_module():
    lines = subprocess.run([sys.executable, "-m", "agcl", "methods"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert "supervised" in names and names == sorted(names)


def test_download_form_and_second_run(tmp_path, shared_mirror, capsys):
    dest = tmp_path / "la"
    args = ["download", "la", "--dest", str(dest), "--base-url", f"file://{shared_mirror}",
            "--cases", "06SR5RBREL16DQ6M8LWS,0RZDK210BSMWAA6467LU", "--no-progress"]
    assert main(args) == 0
    assert (dest / "2018LA_Seg_Training Set" / "06SR5RBREL16DQ6M8LWS" / "mri_norm2.h5").is_file()
    assert main(args) == 0
    assert "4 files verified" in capsys.readouterr().out


def test_download_unknown_case_fails_with_message(tmp_path, shared_mirror, capsys):
    code = main(["download", "la", "--dest", str(tmp_path), "--base-url", f"file://{shared_mirror}",
                 "--cases", "NOSUCHCASE", "--no-progress"])
    assert code == 1
    assert "NOSUCHCASE" in capsys.readouterr().err


def test_synth_form(tmp_path):
    assert main(["synth", "la", "--out", str(tmp_path / "la"), "--seed", "3"]) == 0
    assert (tmp_path / "la" / "train.list").is_file()


def test_bad_config_exits_nonzero_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseeds: [0]\nmethods: [supervised]\nratios: [2]\ndatasets: {}\n")
    assert main(["splits", "la", "--config", str(bad), "--seed", "0"]) == 1
    assert "ratios.0" in capsys.readouterr().err


def test_train_requires_its_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "la"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --config, --method, --labels, --seed" in err


# --- one convention ---------------------------------------------------------------------------
DATASET_COMMANDS = {"download": ["la", "acdc"], "synth": ["la", "acdc", "crag"],
                    "preprocess": ["la", "acdc", "crag"], "splits": ["la", "acdc", "crag"],
                    "train": ["la", "acdc", "crag"], "evaluate": ["la", "acdc", "crag"]}


@pytest.mark.parametrize("command", sorted(DATASET_COMMANDS))
def test_dataset_is_the_first_positional_everywhere(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "{" + ",".join(DATASET_COMMANDS[command]) + "}" in usage
    assert "--dataset" not in usage


def test_train_help_shows_its_required_options_as_required(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())
    for option in ("--config FILE [FILE ...]", "--method METHOD", "--labels LABELS", "--seed SEED"):
        assert option in usage and f"[{option}]" not in usage
    assert "[--out OUT]" in usage and "--list-methods" not in usage


@pytest.mark.parametrize("position", ["before", "after"])
def test_verbose_and_debug_work_before_or_after_the_subcommand(position):
    args = ["methods"]
    args = ["-v", "--debug", *args] if position == "before" else [*args, "-v", "--debug"]
    parsed = build_parser().parse_args(args)
    assert parsed.verbose is True and parsed.debug is True
    assert build_parser().parse_args(["methods"]).verbose is False


def test_version_names_the_code_version(capsys):
    from agcl.common.utils import code_version

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"agcl {code_version()}"


def test_key_errors_print_without_stray_quotes(tmp_path, capsys):
    import yaml

    from tests.conftest import tiny_config

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    # an unknown hyperparameter raises a KeyError (HparamError): its text, not repr(), is shown
    code = main(["train", "la", "--config", str(config), "--method", "supervised", "--labels",
                 "0.1", "--seed", "0", "--out", str(tmp_path / "run"), "--set", "ema_decayy=0.9"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("agcl train: error: method 'supervised' has no hyperparameter "
                          "ema_decayy (known: ")
    code = main(["train", "la", "--config", str(config), "--method", "nope", "--labels", "0.1",
                 "--seed", "0", "--out", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "methods[0]: 'nope' is not a registered method or a variant (registered: " in err
    assert not (tmp_path / "run").exists()


def test_readme_documents_the_command_forms():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for form in ("agcl splits {la,acdc,crag} --config FILE --seed N",
                 "agcl train {la,acdc,crag} --config FILE --method NAME --labels RATIO --seed N",
                 "agcl evaluate {la,acdc,crag} --config FILE",
                 "agcl methods"):
        assert form in readme, form
    assert "--list-methods" not in readme and "--dataset NAME" not in readme


def test_train_prints_its_stage_plan_and_smoke_steps_shorten_every_stage(tmp_path, capsys,
                                                                          monkeypatch):
    """A new user's quick check: `--iterations` sets the main stage only, and the run says so
    before training; smoke_steps caps every stage, BCP's pre-training included."""
    import yaml

    from agcl.config import load_config
    from agcl.config.recipe import describe_plan, resolve_recipe, stage_plan
    from tests.conftest import tiny_config

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config()))
    config = load_config(config_path)
    recipe = resolve_recipe(config, "acdc", "bcp", iterations=12)
    plan = stage_plan(config, "acdc", "bcp", recipe, iterations=12)
    assert plan == [("pretrain", 10000, "bcp's default for acdc: pretrain_iterations"),
                    ("main", 12, "--iterations")]
    assert describe_plan(plan).endswith("= 10012 steps")
    over = stage_plan(config, "acdc", "bcp", resolve_recipe(
        config, "acdc", "bcp", overrides={"pretrain_iterations": 5}),
        overrides={"pretrain_iterations": 5})
    assert over == [("pretrain", 5, "--set: pretrain_iterations"),
                    ("main", 4, "datasets.acdc.train.iterations")]
    smoke = yaml.safe_load(config_path.read_text())
    smoke["smoke_steps"] = 3
    config_path.write_text(yaml.safe_dump(smoke))
    config = load_config(config_path)
    recipe = resolve_recipe(config, "acdc", "bcp")
    assert [s.iterations for s in recipe.stages] == [3, 3]
    assert recipe.train_cfg["iterations"] == 3
    assert stage_plan(config, "acdc", "bcp", recipe)[0][2] == "smoke_steps 3 (caps every stage)"
    # the CLI prints the plan before the first step
    monkeypatch.chdir(tmp_path)
    code = main(["train", "acdc", "--config", str(config_path), "--method", "bcp", "--labels",
                 "0.1", "--seed", "0", "--out", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr()
    assert code == 1 and "run `agcl splits` first" in out.err  # no data yet: refused, but ...
    assert out.out.startswith("bcp on acdc r0.1 s0: pretrain 3 (smoke_steps 3 (caps every "
                              "stage)) + main 3 (smoke_steps 3 (caps every stage)) = 6 steps")


def test_a_full_disk_is_named_and_aggregate_replaces_all_tables_or_none(tmp_path, monkeypatch,
                                                                         capsys):
    """ENOSPC while aggregate writes its fourth table: the command says the disk is full and
    which file, and the earlier tables are not replaced (all or none)."""
    import errno

    import pandas as pd

    from agcl.cli import main
    from agcl.config import Layout
    from tests.test_report import fake_metrics, fixture_config, write_evaluated_run

    monkeypatch.chdir(tmp_path)
    config = fixture_config()
    for method in config["methods"]:
        for ratio in config["ratios"]:
            for seed in config["seeds"]:
                write_evaluated_run(Layout(config).run("la", method, ratio, seed),
                                    fake_metrics(method, ratio, seed, "metrics_reloaded"),
                                    train_seconds=1, parameters=1, device="cpu", amp="off")
    (tmp_path / "c.yaml").write_text(__import__("yaml").safe_dump(config))
    assert main(["aggregate", "--config", "c.yaml"]) == 0
    summary = Layout(config).results / "summary"
    before = {p.name: p.read_bytes() for p in summary.glob("*.csv")}
    written = []
    real = pd.DataFrame.to_csv

    def to_csv(self, path, *args, **kwargs):
        written.append(path)
        if len(written) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    config["seeds"] = [0]  # a run that would change every table
    (tmp_path / "c.yaml").write_text(__import__("yaml").safe_dump(config))
    assert main(["aggregate", "--config", "c.yaml"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full while writing" in err and "free some space" in err
    assert {p.name: p.read_bytes() for p in summary.glob("*.csv")} == before
    assert not list(summary.glob(".*.tmp"))
