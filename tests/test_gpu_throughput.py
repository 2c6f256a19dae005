"""benchmarks/gpu_throughput.py on CPU in its --quick smoke mode: the rows it writes are the ones
`agcl plan` reads, and a rerun replaces them instead of adding more."""

from __future__ import annotations

import math

import pytest

from agcl.config import load_config
from agcl.report.plan import gpu_hours, read_throughput
from tests.conftest import REPO_ROOT, load_benchmark


def test_quick_run_writes_rows_that_plan_reads(tmp_path, capsys):
    script = load_benchmark("gpu_throughput")
    out = tmp_path / "throughput.csv"
    args = ["--device", "cpu", "--quick", "--warmup", "1", "--steps", "2", "--datasets", "acdc",
            "--methods", "supervised", "bcp", "--out", str(out), "--workdir", str(tmp_path / "w")]
    assert script.main(args) == 0
    table = read_throughput(out)
    assert sorted(zip(table["method"], table["stage"])) == [
        ("bcp", "main"), ("bcp", "pretrain"), ("supervised", "main")]
    assert (table["steps_per_s"] > 0).all()
    assert table["wait_share"].between(0, 1).all()
    assert (table["val_seconds"] > 0).all()  # ACDC selects on val: one pass per stage timed
    assert (table["patch"] == "32x32").all() and (table["amp_dtype"] == "off").all()
    printed = capsys.readouterr().out
    assert "acdc,bcp,pretrain," in printed and "3 rows ->" in printed

    # agcl plan projects the same recipe from these rows: every stage at its measured rate,
    # plus one validation pass per val_every steps
    config = script.benchmark_config(load_config(REPO_ROOT / "config" / "config.yaml"), ["acdc"],
                                     True, "cpu", tmp_path / "w")
    hours = gpu_hours(config, table).set_index(["dataset", "method"])
    card = table["card"].iloc[0]
    sup = table[table["method"] == "supervised"].iloc[0]
    iterations = config["datasets"]["acdc"]["train"]["iterations"]
    val_every = config["datasets"]["acdc"]["train"]["val_every"]
    expected = iterations / sup["steps_per_s"] + iterations // val_every * sup["val_seconds"]
    assert hours.loc[("acdc", "supervised"), f"{card} h/run"] == pytest.approx(expected / 3600)
    assert not math.isnan(hours.loc[("acdc", "bcp"), f"{card} h/run"])

    assert script.main(args[:-4] + ["--methods", "supervised", "--out", str(out)]) == 0
    again = read_throughput(out)
    assert len(again) == 3  # the supervised row replaced, bcp's kept
