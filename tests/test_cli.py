"""The fixed command-line forms users script against."""

import subprocess
import sys

import pytest

from agcl.cli import build_parser, main

COMMANDS = ["download", "ingest-crag", "synth", "preprocess", "splits", "train", "evaluate",
            "aggregate", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_console_entry_point_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "agcl", "train", "--list-methods"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert "supervised" in out and out == sorted(out)


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
    assert main(["splits", "--config", str(bad), "--dataset", "la", "--seed", "0"]) == 1
    assert "ratios.0" in capsys.readouterr().err


def test_train_requires_its_arguments():
    with pytest.raises(SystemExit, match="--config"):
        main(["train", "--dataset", "la"])
