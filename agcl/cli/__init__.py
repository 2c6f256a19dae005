"""`agcl`: one console script whose subcommands are the workflow's stages.

Every Snakemake rule calls one of these; each also works by hand. One convention throughout: the
dataset (la, acdc, crag) is the first positional argument of every command that works on one
dataset; files are options; `-v` and `--debug` go before or after the subcommand. Exit status is
non-zero on any failure, with one line naming what was wrong (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import logging
import re
import sys
from pathlib import Path

from agcl.cli.commands import (
    _csv_list,
    cmd_aggregate,
    cmd_download,
    cmd_evaluate,
    cmd_ingest_crag,
    cmd_methods,
    cmd_plan,
    cmd_preprocess,
    cmd_report,
    cmd_splits,
    cmd_synth,
    cmd_train,
)
from agcl.data.specs import SPECS

DATASETS = list(SPECS)


def _int_pair(text: str) -> tuple[int, int]:
    parts = _csv_list(text)
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST counts such as 173,40, got '{text}'")
    return int(parts[0]), int(parts[1])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{text}'")
    return int(text)


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{text}'")
    return text


def _label_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a labeled fraction in (0, 1] such as 0.05, "
                                         f"got '{text}'")
    return value


LAYERED = "config file(s), layered in order as snakemake --configfile does"


# --- parser -----------------------------------------------------------------------------------
def _global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log at INFO level")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks on errors")


def _dataset(p: argparse.ArgumentParser, choices=DATASETS) -> None:
    p.add_argument("dataset", choices=choices, help=f"one of {', '.join(choices)}")


def _run_identity(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--method", required=required, help="registered method (agcl methods)")
    p.add_argument("--labels", type=_label_fraction, required=required,
                   help="labeled fraction, e.g. 0.05")
    p.add_argument("--seed", type=_seed, required=required)


class _CodeVersion(argparse.Action):
    """--version: package version and git commit, looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the package version and git commit, and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from agcl.common.utils import code_version

        print(f"agcl {code_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agcl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_CodeVersion)
    _global_options(parser, default=False)
    # Subcommands accept the same options after their name; SUPPRESS keeps a value given before.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    p = command("download", "fetch LA or ACDC files, verified against sha256 manifests", cmd_download)
    _dataset(p, [name for name, spec in SPECS.items() if spec.manifests])
    p.add_argument("--dest", required=True, help="dataset folder to fill")
    p.add_argument("--base-url", default="https://raw.githubusercontent.com",
                   help="raw-file host; file://<abs path> reads a local mirror")
    p.add_argument("--cases", help="comma-separated case ids (LA ids, ACDC patientXXX) to restrict to")
    p.add_argument("--workers", type=_positive_int, default=4, help="parallel fetches")
    p.add_argument("--no-progress", action="store_true")

    p = command("ingest-crag", "verify a user-supplied CRAG zip or folder and copy it", cmd_ingest_crag)
    p.add_argument("path", help="CRAG zip or unpacked folder")
    p.add_argument("--dest", required=True)
    p.add_argument("--expect", type=_int_pair, default=(173, 40), metavar="TRAIN,TEST",
                   help="expected image counts (default 173,40)")
    p.add_argument("--max-member-mb", type=float, default=64.0, metavar="MB",
                   help="largest file accepted from the zip or folder (default 64)")

    p = command("synth", "write a synthetic dataset in the upstream on-disk format", cmd_synth)
    _dataset(p)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--config", nargs="+", metavar="FILE",
                   help="take sizes and counts from datasets.<name>.synth")
    p.add_argument("--zip", action="store_true", help="CRAG: write CRAG.zip like the download")

    p = command("preprocess", "dataset folder -> processed arrays and index.json", cmd_preprocess)
    _dataset(p)
    p.add_argument("--src", required=True, help="dataset folder (downloaded, ingested, synthetic)")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, help="CRAG resampling factor (default 1)")
    p.add_argument("--config", nargs="+", metavar="FILE",
                   help="take the scale from datasets.<name>.scale")

    p = command("splits", "train/val/test ids and nested labeled subsets for one seed", cmd_splits)
    _dataset(p)
    p.add_argument("--config", required=True, nargs="+", metavar="FILE", help=LAYERED)
    p.add_argument("--seed", type=_seed, required=True)
    p.add_argument("--out", help="default: <results_dir>/<name>/splits/<dataset>/seed<k>.json")

    command("methods", "list the registered methods", cmd_methods)

    p = command("train", "train one dataset x method x label ratio x seed", cmd_train)
    _dataset(p)
    p.add_argument("--config", required=True, nargs="+", metavar="FILE", help=LAYERED)
    _run_identity(p, required=True)
    p.add_argument("--out", help="run folder (default: the config's, "
                                 "<results_dir>/<name>/runs/<dataset>/<method>/r<labels>/s<seed>)")
    p.add_argument("--iterations", type=_positive_int,
                   help="steps of the main stage (overrides datasets.<name>.train.iterations); "
                        "a pre-training stage keeps its own length (e.g. BCP's "
                        "pretrain_iterations): set smoke_steps in the config to shorten every "
                        "stage")
    p.add_argument("--device", type=_device, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method hyperparameter, or train.KEY of the dataset's "
                        "training config (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="retrain from scratch, removing the run's checkpoints, log and metrics")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")

    p = command("evaluate", "test-set metrics of one finished run -> metrics.json", cmd_evaluate)
    _dataset(p)
    p.add_argument("--config", required=True, nargs="+", metavar="FILE", help=LAYERED)
    p.add_argument("--run", help="run folder; or give --method, --labels and --seed")
    _run_identity(p, required=False)
    p.add_argument("--device", type=_device, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--save-predictions", action="store_true",
                   help="also write predictions.npz (label maps per test case, for the report)")

    p = command("aggregate", "every run's metrics.json -> tidy CSV tables", cmd_aggregate)
    p.add_argument("--config", required=True, nargs="+", metavar="FILE", help=LAYERED)
    p.add_argument("--out", help="default: <results_dir>/<name>/summary")

    p = command("report", "tables + plots -> <reports_dir>/<name>/index.html", cmd_report)
    p.add_argument("--config", required=True, nargs="+", metavar="FILE", help=LAYERED)
    p.add_argument("--out", help="default: <reports_dir>/<name>/index.html")

    p = command("plan", "jobs per rule, projected GPU hours and disk space of a config's grid",
                cmd_plan)
    p.add_argument("--config", required=True, nargs="+", metavar="FILE", help=LAYERED)
    p.add_argument("--throughput",
                   help="steps per second measured by benchmarks/gpu_throughput.py (default: "
                        "<results_dir>/<name>/benchmarks/throughput.csv, where it writes)")
    p.add_argument("--snakefile",
                   help="workflow of the dry run (default: ./Snakefile, else the Snakefile of "
                        "the checkout agcl runs from)")
    return parser


def error_message(exc: BaseException) -> str:
    """One line for users: a KeyError's text without the quotes str() puts around it; a full
    disk named as such, with the file and what to do (every file is written to a temporary and
    renamed, and aggregate's tables all together, so nothing is left half-written)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (f"the disk is full{where} ({exc.strerror}): free some space and run the same "
                "command again (no file was left half-written)")
    return str(exc) or type(exc).__name__


def _wants_reproducible_cpu(config_path) -> bool | None:
    """One config file's `reproducible_cpu` (None: not set there), read before anything imports
    torch (a file that cannot be read says None here; loading it properly reports the error)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict) or "reproducible_cpu" not in raw:
        return None
    return raw["reproducible_cpu"] is True


def _pin_numerics_if_asked(args) -> None:
    paths = getattr(args, "config", None) or []
    # the last layer that sets it decides, as in the merged config
    wanted = [w for w in map(_wants_reproducible_cpu, paths) if w is not None]
    if wanted and wanted[-1]:
        from agcl.runtime.numerics import REPRODUCIBLE_THREADS, pin_cpu_numerics

        pin_cpu_numerics()
        if hasattr(args, "threads") and args.threads is None:
            args.threads = REPRODUCIBLE_THREADS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _pin_numerics_if_asked(args)
        args.func(args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one clear line for users; the traceback with --debug
        if args.debug:
            raise
        print(f"agcl {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
