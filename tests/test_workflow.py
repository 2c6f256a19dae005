"""Snakemake parses, validates and lints the workflow; the paper grid dry-runs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def snakemake(*args, cwd=REPO):
    # Jobs run `python -m agcl`: the interpreter of this test session, as under `make demo`.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False, env=env)


def test_lint_is_clean():
    out = snakemake("--lint", "--configfile", "config/demo.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Lints for" not in out.stdout + out.stderr


@pytest.mark.parametrize("configfile,jobs", [("config/demo.yaml", "train"),
                                               ("config/config.yaml", "train"),
                                               ("config/reference.yaml", "train"),
                                               ("config/cpu_study.yaml", "train")])
def test_dry_run_plans_every_training_run(configfile, jobs, tmp_path):
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "CRAG.zip").touch()  # the paper grid expects the user's CRAG zip
    out = snakemake("-n", "--configfile", configfile, "--cores", "1", "--directory", str(tmp_path),
                    "--snakefile", str(REPO / "Snakefile"))
    assert out.returncode == 0, out.stdout + out.stderr
    import yaml

    sys.path.insert(0, str(REPO))
    from agcl.config import expected_runs, load_config

    n_runs = len(expected_runs(load_config(REPO / configfile)))
    table = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()
             if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert int(table[jobs]) == n_runs
    assert int(table["evaluate"]) == n_runs
    assert yaml  # imported for config parsing above


def test_bad_config_stops_snakemake_naming_the_key(tmp_path):
    import yaml

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["datasets"]["la"]["train"]["iterations"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    out = snakemake("-n", "--configfile", str(bad), "--cores", "1")
    assert out.returncode != 0
    # Snakemake's validate() names the key as a path into the config
    assert "['datasets']['la']['train']['iterations']" in out.stdout + out.stderr


def test_a_patch_geometry_that_cannot_work_stops_the_dag_build(tmp_path):
    # The CPU study's 48x48 crops with the paper's 32-pixel patches: refused at parse time, with
    # the numbers and the fix, before any job (semi_agcl is the last run of the grid to train).
    overlay = tmp_path / "patch32.yaml"
    overlay.write_text("datasets:\n  acdc:\n    hparams:\n      semi_agcl: {contrast_patch: 32}\n")
    out = snakemake("-n", "--configfile", "config/cpu_study.yaml", str(overlay), "--cores", "1",
                    "--directory", str(tmp_path), "--snakefile", str(REPO / "Snakefile"))
    assert out.returncode != 0
    assert ("datasets.acdc: semi_agcl: contrast_patch 32 on a 48x48 crop gives 1 patch per image "
            "(needs >= 16): set datasets.acdc.hparams.semi_agcl.contrast_patch <= 12"
            ) in out.stdout + out.stderr


def dry_run_commands(*args, cwd):
    out = snakemake("-n", "-p", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
                    "--directory", str(cwd), *args)
    return out, out.stdout + out.stderr


def test_layered_configfiles_reach_the_jobs_merged(tmp_path):
    import yaml

    sys.path.insert(0, str(REPO))
    from agcl.config import load_config

    overlay = tmp_path / "one_seed.yaml"
    overlay.write_text(yaml.safe_dump({"seeds": [3], "methods": ["supervised"]}))
    out, text = dry_run_commands("--configfile", str(REPO / "config" / "demo.yaml"), str(overlay),
                                 cwd=tmp_path)
    assert out.returncode == 0, text
    merged = tmp_path / "results" / "demo" / "config.merged.yaml"
    assert f"--config {merged.relative_to(tmp_path)}" in text or f"--config {merged}" in text
    config = load_config(merged)  # complete and valid on its own, unlike the overlay
    assert config["seeds"] == [3] and config["methods"] == ["supervised"]
    assert config["datasets"]["la"]["train"]["iterations"] == 60  # from demo.yaml
    train_jobs = [line for line in text.splitlines() if "agcl train " in line]
    # 3 datasets x seed 3 x (supervised at 0.05, 0.1, 1 + the demo's noise twin at 0.05, 0.1)
    assert len(train_jobs) == 3 * (3 + 2)
    assert all("--seed 3" in line for line in train_jobs)


def test_paper_grid_without_crag(tmp_path):
    out, text = dry_run_commands("--configfile", str(REPO / "config" / "config.yaml"),
                                 cwd=tmp_path)
    assert out.returncode != 0
    assert "datasets.crag.path: resources/CRAG.zip does not exist" in text
    assert "--config run_datasets='[la,acdc]'" in text

    out, text = dry_run_commands("--configfile", str(REPO / "config" / "config.yaml"),
                                 "--config", "run_datasets=[la,acdc]", cwd=tmp_path)
    assert out.returncode == 0, text
    train_jobs = [line for line in text.splitlines() if "agcl train " in line]
    assert train_jobs and not [line for line in train_jobs if "train crag" in line]
    assert {line.split("agcl train ")[1].split()[0] for line in train_jobs} == {"la", "acdc"}


@pytest.mark.parametrize("target,datasets,methods,n_train", [
    ("method_bcp", {"la", "acdc", "crag"}, {"bcp"}, 3 * 2 * 2),
    ("dataset_crag", {"crag"}, {"supervised", "mean_teacher", "ua_mt", "mc_net", "bcp",
                                "semi_agcl", "supervised_ulp"}, 7 * 2 * 2 + 2),
])
def test_named_targets_plan_one_dataset_or_method(tmp_path, target, datasets, methods, n_train):
    # the target before --configfile, which takes every word after it
    out, text = dry_run_commands(target, "--configfile", str(REPO / "config" / "demo.yaml"),
                                 cwd=tmp_path)
    assert out.returncode == 0, text
    train_jobs = [line.split("agcl train ")[1].split() for line in text.splitlines()
                  if "agcl train " in line]
    assert len(train_jobs) == n_train
    assert {job[0] for job in train_jobs} == datasets
    assert {job[job.index("--method") + 1] for job in train_jobs} == methods
    assert "agcl aggregate" not in text and "agcl report" not in text


def test_editing_a_recipe_reruns_exactly_the_runs_it_changes(tmp_path):
    import yaml

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config.update(seeds=[0], methods=["supervised", "mean_teacher"], ratios=[0.05],
                  full_supervision=False, run_datasets=["crag"])
    config["datasets"]["crag"]["train"].update(iterations=2, val_every=2, checkpoint_every=2)
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(config))
    targets = [f"results/demo/runs/crag/{m}/r0.05/s0/ckpt_final.pt" for m in config["methods"]]
    out = snakemake(*targets, "--configfile", str(first), "--cores", "1",
                    "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr

    def planned(changed):  # the user edits the config file in place
        first.write_text(yaml.safe_dump(changed))
        out = snakemake(*targets, "-n", "--configfile", str(first), "--cores", "1",
                        "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path))
        assert out.returncode == 0, out.stdout + out.stderr
        return [line.split("wildcards:")[1] for line in out.stdout.splitlines()
                if "wildcards:" in line]

    assert planned(config) == []
    logging_only = yaml.safe_load(yaml.safe_dump(config))
    logging_only["datasets"]["crag"]["train"]["log_every"] = 1  # not a training setting
    assert planned(logging_only) == []
    ema = yaml.safe_load(yaml.safe_dump(config))
    ema["datasets"]["crag"]["hparams"]["mean_teacher"] = {"ema_decay": 0.9}
    (job,) = planned(ema)
    assert "method=mean_teacher" in job
    lr = yaml.safe_load(yaml.safe_dump(config))
    lr["datasets"]["crag"]["train"]["lr"] = 0.01
    assert len(planned(lr)) == 2


def test_a_failed_run_under_keep_going_leaves_a_report_of_the_others(tmp_path):
    import yaml

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config.update(seeds=[0], methods=["supervised", "mean_teacher"], ratios=[0.05],
                  full_supervision=False, run_datasets=["crag"], noise_floor={"methods": []})
    crag = config["datasets"]["crag"]
    crag["train"].update(iterations=3, val_every=3, checkpoint_every=3)
    # mean_teacher's weights blow up after its first step, and the run stops on the NaN loss
    crag["train_by_method"] = {"mean_teacher": {"lr": 1.0e30, "nonfinite": "stop"}}
    configfile = tmp_path / "one_fails.yaml"
    configfile.write_text(yaml.safe_dump(config))
    # the CPU profile (make demo's) keeps going by itself
    out = snakemake("--profile", str(REPO / "profiles" / "cpu"), "--workflow-profile", "none",
                    "--configfile", str(configfile), "--cores", "1",
                    "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Error in rule train" in text and "method=mean_teacher" in text
    assert "rendering the summary and report from the 1 of 2 runs that finished" in text
    summary = tmp_path / "results" / "demo" / "summary"
    runs = (summary / "runs.csv").read_text()
    assert "supervised" in runs and "mean_teacher" not in runs
    missing = (summary / "missing.csv").read_text()
    # the training error's own line and the job's log, not "not evaluated (no metrics.json)"
    log = "logs/demo/train/crag/mean_teacher/r0.05/s0.log"
    assert "train failed: agcl train: error: crag/mean_teacher r0.05 s0, stage main" in missing
    assert "stopping (train.nonfinite: stop)" in missing and f"(log: {log})" in missing
    html = (tmp_path / "reports" / "demo" / "index.html").read_text()
    assert "1 of 2 runs of the grid are evaluated" in html
    assert "<li>crag / mean_teacher / 5% / seed 0: train failed: agcl train: error:" in html


def test_label_efficiency_overlay_plans_five_ratios(tmp_path):
    sys.path.insert(0, str(REPO))
    from agcl.config import expected_runs, load_config

    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "CRAG.zip").touch()
    files = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "label_efficiency.yaml")]
    out, text = dry_run_commands("--configfile", *files, cwd=tmp_path)
    assert out.returncode == 0, text
    config = load_config(*files)
    train_jobs = [line for line in text.splitlines() if "agcl train " in line]
    # (LA 11 of the 14 methods, ACDC and CRAG 12: dtc and sassnet are 3D only, cps, unimatch and
    # abd 2D only) x 5 ratios, + the 100 % supervised bound on each dataset, x 3 seeds
    assert len(train_jobs) == len(expected_runs(config)) == ((11 + 12 + 12) * 5 + 3) * 3
    assert {line.split("--labels ")[1].split()[0] for line in train_jobs} == {
        "0.01", "0.03", "0.05", "0.1", "0.2", "1"}
    assert all("results/label_efficiency/runs/" in line for line in train_jobs)


def test_ablations_overlay_plans_every_variant_on_acdc(tmp_path):
    files = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "ablations.yaml")]
    out, text = dry_run_commands("--configfile", *files, cwd=tmp_path)  # ACDC only: no CRAG zip
    assert out.returncode == 0, text
    train_jobs = [line.split("agcl train ")[1].split() for line in text.splitlines()
                  if "agcl train " in line]
    methods = {job[job.index("--method") + 1] for job in train_jobs}
    assert methods == {"semi_agcl", "semi_agcl_cosine", "semi_agcl_class_confidence",
                       "semi_agcl_gk_l1", "semi_agcl_no_nuclear", "semi_agcl_mix_half",
                       "semi_agcl_mix_random"}
    assert len(train_jobs) == 7 * 2 * 3 and {job[0] for job in train_jobs} == {"acdc"}


def test_cpu_study_terms_overlay_plans_the_variants(tmp_path):
    files = [str(REPO / "config" / "cpu_study.yaml"), str(REPO / "config" / "cpu_study_terms.yaml")]
    out, text = dry_run_commands("--configfile", *files, cwd=tmp_path)
    assert out.returncode == 0, text
    train_jobs = [line.split("agcl train ")[1].split() for line in text.splitlines()
                  if "agcl train " in line]
    # bcp, semi_agcl, 4 variants and bcp's noise twin x 8 seeds, 5 % only
    assert len(train_jobs) == (6 + 1) * 8
    assert {job[job.index("--labels") + 1] for job in train_jobs} == {"0.05"}


def test_noise_floor_plans_a_twin_of_each_run_of_the_named_method(tmp_path):
    import yaml

    overlay = tmp_path / "noise.yaml"
    overlay.write_text(yaml.safe_dump({"methods": ["supervised", "bcp"], "full_supervision": False,
                                       "noise_floor": {"methods": ["bcp"]}}))
    out, text = dry_run_commands("--configfile", str(REPO / "config" / "demo.yaml"), str(overlay),
                                 cwd=tmp_path)
    assert out.returncode == 0, text
    jobs = [line.split("agcl train ")[1].split() for line in text.splitlines()
            if "agcl train " in line]
    methods = [job[job.index("--method") + 1] for job in jobs]
    # 3 datasets x 2 ratios x 2 seeds of each: supervised, bcp and bcp's twin
    assert {m: methods.count(m) for m in set(methods)} == {"supervised": 12, "bcp": 12,
                                                           "bcp_ulp": 12}


def readme_example() -> str:
    import re

    return re.search(r"`baselines/entropy_min.py`:\n\n```python\n(.*?)```",
                     (REPO / "README.md").read_text(), re.DOTALL).group(1)


def test_a_baseline_file_dropped_in_baselines_is_validated_and_trained_by_the_dag(tmp_path):
    """The README's route, as a user takes it: the example file in the workflow's baselines/,
    the method in `methods:`, and nothing else edited (a copy of the workflow, so the
    checkout's baselines/ stays as it is)."""
    import yaml

    kit = tmp_path / "kit"
    for part in ("workflow", "baselines"):
        shutil.copytree(REPO / part, kit / part)
    shutil.copy(REPO / "Snakefile", kit / "Snakefile")
    (kit / "baselines" / "entropy_min.py").write_text(readme_example())
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config.update(seeds=[0], methods=["entropy_min"], ratios=[0.05], full_supervision=False,
                  run_datasets=["crag"], noise_floor={"methods": []},
                  hparams={"entropy_min": {"weight": 0.2}})
    config["datasets"]["crag"]["train"].update(iterations=3, val_every=3, checkpoint_every=3)
    config.pop("roles", None)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "AGCL_PLUGIN_DIRS"}  # the kit's alone
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    def run(cfg, *args):
        path = tmp_path / "entropy_min.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return subprocess.run([*SNAKEMAKE, "--configfile", str(path), "--cores", "1",
                               "--snakefile", str(kit / "Snakefile"), "--directory", str(work),
                               *args], check=False, capture_output=True, text=True, timeout=600, env=env)

    bad = yaml.safe_load(yaml.safe_dump(config))
    bad["hparams"]["entropy_min"]["weight"] = -1.0
    out = run(bad, "-n")
    assert out.returncode != 0
    assert "entropy_min hparam weight: expected >= 0.0, got -1.0" in out.stdout + out.stderr
    out = run(config)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_json = work / "results" / "demo" / "runs" / "crag" / "entropy_min" / "r0.05" / "s0"
    import json

    meta = json.loads((run_json / "run.json").read_text())
    assert meta["hparams"]["weight"] == 0.2 and meta["iterations"] == 3
    assert (run_json / "metrics.json").exists()
    assert "entropy_min" in (work / "results" / "demo" / "summary" / "runs.csv").read_text()


def test_the_lower_bound_role_trains_at_100_percent_and_an_unknown_role_stops_snakemake(tmp_path):
    import yaml

    overlay = tmp_path / "roles.yaml"
    overlay.write_text(yaml.safe_dump({"roles": {"lower_bound": "mean_teacher"},
                                       "noise_floor": {"methods": []}}))
    out, text = dry_run_commands("method_mean_teacher", "--configfile",
                                 str(REPO / "config" / "demo.yaml"), str(overlay), cwd=tmp_path)
    assert out.returncode == 0, text
    jobs = [line.split("agcl train ")[1].split() for line in text.splitlines()
            if "agcl train " in line]
    # 3 datasets x 2 seeds x (0.05, 0.1 and, as the lower bound, 1)
    assert sorted({job[job.index("--labels") + 1] for job in jobs}) == ["0.05", "0.1", "1"]
    assert len(jobs) == 3 * 2 * 3
    merged = yaml.safe_load((tmp_path / "results" / "demo" / "config.merged.yaml").read_text())
    assert merged["roles"] == {"lower_bound": "mean_teacher", "method_of_interest": "semi_agcl"}
    overlay.write_text(yaml.safe_dump({"roles": {"lower_bound": "nope"}}))
    out, text = dry_run_commands("--configfile", str(REPO / "config" / "demo.yaml"), str(overlay),
                                 cwd=tmp_path)
    assert out.returncode != 0
    assert "roles.lower_bound: 'nope' is not in methods (supervised, mean_teacher" in text


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/reference.yaml"])
def test_the_paper_grid_is_planned_where_torch_cannot_be_imported(configfile, tmp_path):
    """A login node whose Python has no torch: `snakemake -n` still resolves and checks every
    recipe (agcl.config.torch_stand_in' stand-in), and plans the same jobs."""
    blocker = tmp_path / "blocked" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "CRAG.zip").touch()
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{REPO}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True,
                           text=True, check=False)
    assert check.returncode != 0 and "torch is not installed here" in check.stderr
    out = subprocess.run([*SNAKEMAKE, "-n", "--configfile", configfile, "--cores", "1",
                          "--directory", str(tmp_path), "--snakefile", str(REPO / "Snakefile")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                         env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with_torch = snakemake("-n", "--configfile", configfile, "--cores", "1", "--directory",
                           str(tmp_path), "--snakefile", str(REPO / "Snakefile"))
    def job_counts(text):  # the dry run's table: rule, count
        return {line.split()[0]: int(line.split()[1]) for line in text.splitlines()
                if len(line.split()) == 2 and line.split()[1].isdigit()}

    assert job_counts(out.stdout)["train"] > 0
    assert job_counts(out.stdout) == job_counts(with_torch.stdout)


def test_editing_a_config_key_reruns_the_rules_that_read_it(tmp_path):
    """Every config key a rule reads is part of what decides whether it reruns: a finished
    one-run grid, then in-place edits of keys read by synth, splits, evaluate and aggregate."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config.update(seeds=[0], methods=["supervised"], ratios=[0.05], full_supervision=False,
                  run_datasets=["crag"], noise_floor={"methods": []})
    config["datasets"]["crag"]["train"].update(iterations=2, val_every=2, checkpoint_every=2)
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(config))
    common = ["--configfile", str(first), "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
              "--directory", str(tmp_path)]
    out = snakemake(*common)
    assert out.returncode == 0, out.stdout + out.stderr

    def planned(changed):  # the user edits the config file in place
        first.write_text(yaml.safe_dump(changed))
        out = snakemake("-n", "--quiet", "rules", *common)
        assert out.returncode == 0, out.stdout + out.stderr
        return set(re.findall(r"^(\w+)\s+\d+$", out.stdout.split("Job stats:")[-1],
                              re.MULTILINE)) - {"total", "all"} if "Job stats" in out.stdout \
            else set()

    def edited(path, value):
        changed = yaml.safe_load(yaml.safe_dump(config))
        node = changed
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        return changed

    assert planned(config) == set()
    assert planned(edited(["datasets", "crag", "train", "log_every"], 1)) == set()
    assert planned(edited(["stats", "smallest_effect"], {"dice": 0.05})) == {"aggregate",
                                                                               "report"}
    assert planned(edited(["datasets", "crag", "eval", "largest_component"], True)) == {
        "evaluate", "aggregate", "report"}
    assert {"splits", "train", "evaluate"} <= planned(
        edited(["datasets", "crag", "val_cases"], config["datasets"]["crag"]["val_cases"] + 1))
    synth = dict(config["datasets"]["crag"]["synth"])
    synth["n_test"] = synth.get("n_test", 4) + 1
    assert {"synth_crag_zip", "ingest_crag", "preprocess", "train"} <= planned(
        edited(["datasets", "crag", "synth"], synth))
