import functools
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


# Paths, the run grid, the config schema and the method registry come from the package itself,
# so rules, CLI and aggregation never disagree.
REPO = Path(workflow.basedir).resolve()
sys.path.insert(0, str(REPO))
# The method plugins of this workflow: baselines/ beside the Snakefile (whatever --directory
# says), then the folders a config names under plugin_dirs (relative to the working directory).
# Exported here for the DAG build and handed to every job through AGCL below.
from agcl.common.plugins import export_plugin_dirs  # noqa: E402

PLUGIN_DIRS = export_plugin_dirs(REPO / "baselines")
# Planning reads the methods' declarations only: torch is never imported here (a login node
# without torch plans the grid; the jobs run where it is installed).
from agcl.config.torch_stand_in import declarations_only  # noqa: E402

declarations_only()
from agcl.config import (  # noqa: E402
    SCHEMA_PATH,
    Layout,
    config_rules,
    expected_runs,
    method_eval_config,
)
from agcl.config.load import declares_extends, layered  # noqa: E402
from agcl.config.load import merge as merge_config  # noqa: E402
from agcl.config.checks import check_config  # noqa: E402
from agcl.data.specs import get_spec  # noqa: E402
from agcl.runtime.runfolder import FINAL, METRICS_JSON, RUN_JSON, settings_hash  # noqa: E402

CONFIG_SOURCES = [str(f) for f in workflow.configfiles]
if workflow.config_settings.config:
    CONFIG_SOURCES.append("--config")
SOURCE = " + ".join(CONFIG_SOURCES)
# The config is validated once, against the one schema, the package's (what `agcl` subcommands
# load too): by Snakemake's validate(), as snakemake-workflows do (it fills the defaults and
# names a bad key as a path into the config), then by agcl's rules across keys that no schema
# can say (config_rules: what agcl.config.validate_config runs after its own schema pass). It
# also applies run_datasets (e.g. --config run_datasets='[la,acdc]': the grid without CRAG) and
# resolves the roles (lower bound, method of interest).
# An overlay names its base (`extends: config.yaml`): Snakemake reads only the files given, so
# the base goes under them here, before anything reads the config (the --config keys on top).
if any(declares_extends(f) for f in workflow.configfiles):
    resolved = layered(*workflow.configfiles)
    merge_config(resolved, workflow.config_settings.config or {})
    config.clear()
    config.update(resolved)
validate(config, schema=str(SCHEMA_PATH))
config_rules(config, source=SOURCE)
# Unregistered methods, hparams of a misspelt method, unknown net options: errors now, not
# when the first job of that kind runs.
check_config(config, source=SOURCE)

LAYOUT = Layout(config)


def merged_config_file():
    """The config every job reads: the one --configfile as given, or, when files are layered or
    --config overrides keys, the merged and validated config written beside the results (only
    rewritten when it changes, so its date does not trigger reruns)."""
    if len(workflow.configfiles) == 1 and not workflow.config_settings.config:
        return str(workflow.configfiles[0])
    import yaml

    from agcl.common.utils import write_text

    path = LAYOUT.results / "config.merged.yaml"
    text = f"# merged from {SOURCE}\n{yaml.safe_dump(config, sort_keys=False)}"
    if not path.exists() or path.read_text() != text:
        write_text(path, text)
    return str(path)


CONFIGFILE = merged_config_file()
# Rules run the package from this checkout, in whichever environment runs them (the venv of
# `make demo`, or the conda env of workflow/envs/agcl.yaml under --use-conda).
AGCL = (f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} AGCL_PLUGIN_DIRS='{PLUGIN_DIRS}' "
        "python -m agcl")
ENV = "../envs/agcl.yaml"
LOGS = LAYOUT.logs
# Snakemake's benchmark: files are outputs of the grid: beside its results, not the scripts.
BENCHMARKS = LAYOUT.results / "benchmarks"

RUNS = expected_runs(config)
DATASETS = list(config["datasets"])
METHODS = sorted({run[1] for run in RUNS})
SOURCES = {name: d["source"] for name, d in config["datasets"].items()}


def alternatives(names):
    """Regex matching exactly these names; matches nothing when the list is empty."""
    return "|".join(names) if names else "(?!x)x"


wildcard_constraints:
    dataset=alternatives(DATASETS),
    method=alternatives(METHODS),
    ratio=r"[0-9.]+",
    seed=r"\d+",


def run_dir(wildcards=None):
    if wildcards is None:
        return LAYOUT.run("{dataset}", "{method}", "{ratio}", "{seed}")
    return LAYOUT.run(wildcards.dataset, wildcards.method, wildcards.ratio, wildcards.seed)


def all_metrics(dataset=None, method=None):
    """metrics.json of every run of the grid, or of one dataset's or one method's runs."""
    return [LAYOUT.run(*run) / METRICS_JSON for run in RUNS
            if dataset in (None, run[0]) and method in (None, run[1])]


@functools.cache
def _recipe_hash(dataset, method, ratio):
    from agcl.config.recipe import resolve_recipe

    return resolve_recipe(config, dataset, method, ratio=ratio).settings_hash


# Every recipe of the grid resolved now (config arithmetic, no data): one that cannot train as
# its method means it (e.g. semi_agcl's patch geometry on a small crop) fails the DAG build with
# the method's message, not its job hours in (a noise twin resolves its method's recipe).
for _dataset, _method, _ratio in sorted({run[:3] for run in RUNS}):
    _recipe_hash(_dataset, _method, _ratio)


def recipe_hash(wildcards):
    """Hash of the run's resolved training settings (recipe, hparams, net, stages): a train
    param, so editing a recipe reruns exactly the runs it changes (Snakemake's params trigger)."""
    return _recipe_hash(wildcards.dataset, wildcards.method, wildcards.ratio)


# The config keys each job reads, hashed into a param, so that editing a key in place reruns
# exactly the jobs that read it (Snakemake's params trigger). The training recipe has its own
# hash (recipe_hash).
def dataset_settings(*keys, dataset=None):
    """A param function: hash of the named keys of the job's dataset block (`dataset`: for a
    rule without a dataset wildcard)."""

    def settings(wildcards):
        block = config["datasets"][dataset or wildcards.dataset]
        return settings_hash({key: block.get(key) for key in keys})

    return settings


def eval_settings(wildcards):
    """What `agcl evaluate` reads: the dataset's eval block with the method's eval_by_method."""
    return settings_hash(method_eval_config(config, wildcards.dataset, wildcards.method))


def split_settings(wildcards):
    """What `agcl splits` reads: the dataset's val_cases and the grid's labeled fractions."""
    return settings_hash({"val_cases": config["datasets"][wildcards.dataset]["val_cases"],
                          "ratios": sorted(config["ratios"]),
                          "full_supervision": config["full_supervision"]})


# `agcl aggregate` reads the grid (which runs, which roles) and the statistics' settings;
# `agcl report` reads the whole resolved config (it also prints it).
AGGREGATE_SETTINGS = settings_hash(
    {key: config.get(key) for key in ("seeds", "methods", "ratios", "full_supervision", "roles",
                                      "stats", "noise_floor", "variants")}
    | {"skip_methods": {d: c.get("skip_methods", []) for d, c in config["datasets"].items()}}
)
REPORT_SETTINGS = settings_hash(config)


def crag_source(wildcards):
    """The user's CRAG zip or folder, or the synthetic zip of the demo."""
    crag = config["datasets"]["crag"]
    if crag["source"] == "synthetic":
        return LAYOUT.data / "synthetic" / "CRAG.zip"
    if crag["source"] != "ingest" or not crag["path"]:
        raise WorkflowError("datasets.crag: CRAG has no public URL; set source: ingest and path: "
                            "to the official zip or folder (or source: synthetic)")
    if not Path(crag["path"]).exists():
        raise WorkflowError(
            f"datasets.crag.path: {crag['path']} does not exist. CRAG has no public URL: put "
            "the official zip (Warwick TIA lab) there, or run the grid without CRAG: "
            "--config run_datasets='[la,acdc]'"
        )
    return crag["path"]


REPORT_HTML = LAYOUT.report / "index.html"
