"""benchmarks/gpu_check.py, the check to run the day a GPU is lent, runs on the CPU (--device cpu
--quick, two methods): every step it takes on a GPU, and the JSON it writes."""

from __future__ import annotations

import json

from tests.conftest import load_benchmark


def test_the_gpu_check_runs_on_cpu_and_writes_its_report(tmp_path, capsys):
    script = load_benchmark("gpu_check")
    code = script.main(["--device", "cpu", "--quick", "--methods", "supervised", "semi_agcl",
                        "--warmup", "1", "--steps", "2", "--resume-steps", "4",
                        "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    measured = {(r["dataset"], r["method"], r["stage"]) for r in report["throughput"]}
    assert measured == {("la", "supervised", "main"), ("la", "semi_agcl", "pretrain"),
                        ("la", "semi_agcl", "main"), ("acdc", "supervised", "main"),
                        ("acdc", "semi_agcl", "pretrain"), ("acdc", "semi_agcl", "main")}
    assert all(r["steps_per_s"] > 0 and r["full_schedule_minutes"] > 0
               for r in report["throughput"])
    resume = report["resume"]
    assert resume["identical"] and resume["killed_before_step"] == 6
    assert resume["resumed_at_steps"] == [5]  # from the checkpoint of step 5
    assert report["evaluation"]["cases"] > 0
    assert report["evaluation"]["max_abs_dice_diff"] == 0  # cpu against cpu
    assert report["la_semi_agcl_full_schedule_minutes"] > 0
    printed = capsys.readouterr().out
    assert "identical weights: True" in printed and "LA 5 % semi_agcl full schedule" in printed
