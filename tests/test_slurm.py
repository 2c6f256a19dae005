"""The SLURM profile as a cluster user runs it: snakemake-executor-plugin-slurm submits the grid's
jobs through stub sbatch / sacct / squeue / sinfo / scontrol / sacctmgr / scancel on PATH that
record their arguments (no job ever runs). Checks what a train job asks SLURM for, and that the
training runs go out together rather than one after another."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.test_pipeline import prepare

REPO = Path(__file__).resolve().parents[1]
STUB = """#!/bin/sh
# stub {name}: record the call, answer like an empty cluster
echo "{name} $*" >> "{record}"
{answer}
"""
ANSWERS = {
    # sbatch --parsable prints the job id; the script comes on stdin
    "sbatch": 'cat > /dev/null\nn=$(grep -c "^sbatch " "{record}")\necho "$((1000 + n))"',
    "sacct": "true",
    "squeue": "true",
    "sinfo": "true",
    "scontrol": "echo 'MinJobAge = 300 sec'",
    "sacctmgr": "echo proj42",
    "sshare": "echo proj42",
    "scancel": "true",
}


def install_stubs(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir()
    for name, answer in ANSWERS.items():
        path = bin_dir / name
        path.write_text(STUB.format(name=name, record=record,
                                    answer=answer.format(record=record)))
        path.chmod(0o755)


def sbatch_calls(record: Path, rule: str) -> list[list[str]]:
    if not record.exists():
        return []
    calls = [shlex.split(line.split(" ", 1)[1]) for line in record.read_text().splitlines()
             if line.startswith("sbatch ")]
    return [c for c in calls if any(f"rule_{rule}" in arg for arg in c)]


def option(call: list[str], *names: str) -> str | None:
    """Value of the first of `names` in one sbatch argument list (`-t 5` or `--gpus=1`)."""
    for index, arg in enumerate(call):
        for name in names:
            if arg == name and index + 1 < len(call):
                return call[index + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def test_slurm_profile_submits_training_with_its_own_resources(tiny_project, tmp_path):
    config = yaml.safe_load(tiny_project.read_text())
    config["datasets"] = {"la": config["datasets"]["la"]}
    tiny_project.write_text(yaml.safe_dump(config))
    prepare(tiny_project, "la")  # data stages done, so the first jobs to submit are train jobs
    record = tmp_path / "calls.log"
    install_stubs(tmp_path / "bin", record)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    # The shipped profile with the two edits its comments ask for (partition and account).
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"]["slurm_account"] = "proj42"
    profile["set-resources"]["train"]["slurm_partition"] = "gpu"
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "config.yaml").write_text(yaml.safe_dump(profile))
    # The README's command (--use-conda aside: no conda here).
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--profile", str(tmp_path / "slurm"), "--workflow-profile", "none",
               "--configfile", str(tiny_project)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    expected = 4  # 1 dataset x 2 ratios x 2 seeds, supervised
    deadline = time.time() + 180
    while len(sbatch_calls(record, "train")) < expected and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.5)
    submitted_while_running = process.poll() is None
    process.terminate()  # Snakemake would wait for the (never running) jobs: stop it hard
    try:
        output = process.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
    train_calls = sbatch_calls(record, "train")
    assert len(train_calls) == expected, output[-3000:]
    # All four went out while none had finished: SLURM, not Snakemake, queues the runs.
    assert submitted_while_running, output[-3000:]
    assert not sbatch_calls(record, "evaluate")  # waits for its training run

    for call in train_calls:
        assert option(call, "--gpus") == "1", call
        assert option(call, "-t", "--time") == "1440", call
        assert option(call, "--mem") == "32000", call
        assert option(call, "--cpus-per-task", "-c") == "8", call
        assert option(call, "-p", "--partition") == "gpu", call
        assert option(call, "-A", "--account") == "proj42", call
        assert "--requeue" in call  # preempted training goes back to the queue
        assert "--gres" not in " ".join(call)
    # The local rules (data preparation, aggregation, report) never went to SLURM.
    submitted_rules = {re.search(r"rule_(\w+)", " ".join(c)).group(1)
                       for c in (shlex.split(line.split(" ", 1)[1])
                                 for line in record.read_text().splitlines()
                                 if line.startswith("sbatch "))}
    assert submitted_rules == {"train"}
