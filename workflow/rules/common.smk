import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

# Paths, the run grid and the method registry come from the package itself, so rules, CLI and
# aggregation never disagree (the registry imports torch: Snakemake runs in the agcl env).
REPO = Path(workflow.basedir).resolve()
sys.path.insert(0, str(REPO))
from agcl.config import Layout, expected_runs, validate_config  # noqa: E402
from agcl.methods.registry import check_config  # noqa: E402
from agcl.runfolder import FINAL, METRICS_JSON, RUN_JSON  # noqa: E402

validate_config(config, source=str(workflow.configfiles[-1]))
# Unregistered methods, hparams of a misspelt method, unknown net options: errors now, not
# when the first job of that kind runs.
check_config(config, source=str(workflow.configfiles[-1]))

if workflow.config_settings.config:
    raise WorkflowError(
        "--config KEY=VALUE overrides would not reach the agcl commands the rules run; "
        "put them in a copy of the YAML file and pass it with --configfile"
    )

CONFIGFILE = str(workflow.configfiles[-1])
LAYOUT = Layout(config)
# Rules run the package from this checkout, in whichever environment runs them (the venv of
# `make demo`, or the conda env of workflow/envs/agcl.yaml under --use-conda).
AGCL = f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} python -m agcl"
ENV = "../envs/agcl.yaml"
LOGS = Path("logs") / config["name"]
BENCHMARKS = Path("benchmarks") / config["name"]

RUNS = expected_runs(config)
DATASETS = list(config["datasets"])
SOURCES = {name: d["source"] for name, d in config["datasets"].items()}


def alternatives(names):
    """Regex matching exactly these names; matches nothing when the list is empty."""
    return "|".join(names) if names else "(?!x)x"


wildcard_constraints:
    dataset=alternatives(DATASETS),
    method=alternatives(sorted({run[1] for run in RUNS})),
    ratio=r"[0-9.]+",
    seed=r"\d+",


def run_dir(wildcards=None):
    if wildcards is None:
        return LAYOUT.run("{dataset}", "{method}", "{ratio}", "{seed}")
    return LAYOUT.run(wildcards.dataset, wildcards.method, wildcards.ratio, wildcards.seed)


def all_metrics():
    return [LAYOUT.run(*run) / METRICS_JSON for run in RUNS]


def crag_source(wildcards):
    """The user's CRAG zip or folder, or the synthetic zip of the demo."""
    crag = config["datasets"]["crag"]
    if crag["source"] == "synthetic":
        return LAYOUT.data / "synthetic" / "CRAG.zip"
    if crag["source"] != "ingest" or not crag["path"]:
        raise WorkflowError("datasets.crag: CRAG has no public URL; set source: ingest and path: "
                            "to the official zip or folder (or source: synthetic)")
    return crag["path"]


REPORT_HTML = LAYOUT.report / "index.html"
