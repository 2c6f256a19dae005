"""`agcl`: one console script whose subcommands are the workflow's stages.

Every Snakemake rule calls one of these; each also works by hand. Exit status is non-zero on any
failure, with a one-line message naming what was wrong (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agcl import __version__


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_pair(text: str) -> tuple[int, int]:
    parts = _csv_list(text)
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST counts such as 173,40, got '{text}'")
    return int(parts[0]), int(parts[1])


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# --- subcommands ------------------------------------------------------------------------------
def cmd_download(args) -> None:
    from agcl.data.download import download

    paths = download(args.dataset, args.dest, base_url=args.base_url,
                     cases=_csv_list(args.cases) if args.cases else None,
                     workers=args.workers, progress=not args.no_progress)
    print(f"{args.dataset}: {len(paths)} files verified in {args.dest}")


def cmd_ingest_crag(args) -> None:
    from agcl.data.crag_ingest import ingest_crag

    train, test = args.expect
    summary = ingest_crag(args.path, args.dest, expected_train=train, expected_test=test)
    counts = summary["counts"]
    print(f"CRAG: {counts['train']} train + {counts['test']} test images in {args.dest}")


def cmd_synth(args) -> None:
    from agcl.data import synth

    kwargs = {}
    if args.config:
        from agcl.config import dataset_config, load_config

        kwargs = dict(dataset_config(load_config(args.config), args.dataset).get("synth", {}))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if args.dataset == "crag" and args.zip:
        kwargs["as_zip"] = True
    generator = {"la": synth.synth_la, "acdc": synth.synth_acdc, "crag": synth.synth_crag}
    out = generator[args.dataset](args.out, seed=args.seed, **kwargs)
    print(f"synthetic {args.dataset} written to {out}")


def cmd_preprocess(args) -> None:
    from agcl.data.preprocess import preprocess

    scale = args.scale
    if args.config:
        from agcl.config import dataset_config, load_config

        scale = dataset_config(load_config(args.config), args.dataset)["scale"]
    index = preprocess(args.dataset, args.src, args.out, scale=scale or 1.0)
    print(f"{args.dataset}: {len(index['items'])} items indexed in {args.out}")


def cmd_splits(args) -> None:
    from agcl.config import Layout, dataset_config, load_config
    from agcl.data.preprocess import load_index
    from agcl.data.splits import make_splits
    from agcl.utils import write_json

    config = load_config(args.config)
    layout = Layout(config)
    dcfg = dataset_config(config, args.dataset)
    ratios = list(config["ratios"]) + ([1.0] if config["full_supervision"] else [])
    index = load_index(layout.processed(args.dataset))
    split = make_splits(index, ratios, args.seed, val_cases=dcfg["val_cases"])
    out = Path(args.out) if args.out else layout.splits(args.dataset, args.seed)
    write_json(out, split)
    counts = ", ".join(f"{r}: {e['n']}" for r, e in split["labeled"].items())
    print(f"{args.dataset} seed {args.seed}: labeled {split['unit']}s per ratio {counts} -> {out}")


def cmd_train(args) -> None:
    from agcl.methods.registry import list_methods

    if args.list_methods:
        print("\n".join(list_methods()))
        return
    missing = [f"--{n}" for n in ("config", "dataset", "method", "labels", "seed", "out")
               if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"agcl train: error: missing {', '.join(missing)}")
    from agcl.config import load_config
    from agcl.engine.trainer import Trainer, parse_overrides

    _set_threads(args.threads)
    trainer = Trainer(load_config(args.config), args.dataset, args.method, args.labels, args.seed,
                      args.out, iterations=args.iterations, device=args.device,
                      overrides=parse_overrides(args.set), force=args.force,
                      progress=not args.no_progress)
    meta = trainer.run()
    print(f"trained {meta['method']} on {meta['dataset']} r{args.labels} s{args.seed}: "
          f"{meta['iterations']} iterations in {meta['train_seconds']:.1f} s -> {args.out}")


def cmd_evaluate(args) -> None:
    from agcl.config import load_config
    from agcl.eval.evaluate import evaluate_run

    _set_threads(args.threads)
    summary = evaluate_run(load_config(args.config), args.dataset, args.run, device=args.device,
                           save_predictions=args.save_predictions)
    fg = summary["foreground_mean"]
    print(f"{args.run}: Dice {fg['dice']:.4f} Jaccard {fg['jaccard']:.4f} "
          f"HD95 {fg['hd95']:.2f} ASD {fg['asd']:.2f} ({summary['protocol']['units']})")


def cmd_aggregate(args) -> None:
    from agcl.config import load_config
    from agcl.report.aggregate import aggregate

    tables = aggregate(load_config(args.config), out_dir=args.out)
    print(f"aggregated {tables['n_runs']} runs ({tables['n_missing']} missing) -> {tables['out_dir']}")


def cmd_report(args) -> None:
    from agcl.config import load_config
    from agcl.report.render import render_report

    path = render_report(load_config(args.config), out=args.out)
    print(f"report written to {path}")


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agcl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"agcl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch LA or ACDC files, verified against sha256 manifests")
    p.add_argument("dataset", choices=["la", "acdc"])
    p.add_argument("--dest", required=True, help="dataset folder to fill")
    p.add_argument("--base-url", default="https://raw.githubusercontent.com",
                   help="raw-file host; file://<abs path> reads a local mirror")
    p.add_argument("--cases", help="comma-separated case ids (LA ids, ACDC patientXXX) to restrict to")
    p.add_argument("--workers", type=int, default=4, help="parallel fetches")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("ingest-crag", help="verify a user-supplied CRAG zip or folder and copy it")
    p.add_argument("path", help="CRAG zip or unpacked folder")
    p.add_argument("--dest", required=True)
    p.add_argument("--expect", type=_int_pair, default=(173, 40), metavar="TRAIN,TEST",
                   help="expected image counts (default 173,40)")
    p.set_defaults(func=cmd_ingest_crag)

    p = sub.add_parser("synth", help="write a synthetic dataset in the upstream on-disk format")
    p.add_argument("dataset", choices=["la", "acdc", "crag"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="take sizes and counts from datasets.<name>.synth")
    p.add_argument("--zip", action="store_true", help="CRAG: write CRAG.zip like the download")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("preprocess", help="dataset folder -> processed arrays and index.json")
    p.add_argument("dataset", choices=["la", "acdc", "crag"])
    p.add_argument("--src", required=True, help="dataset folder (downloaded, ingested, synthetic)")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, help="CRAG resampling factor (default 1)")
    p.add_argument("--config", help="take the scale from datasets.<name>.scale")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("splits", help="train/val/test ids and nested labeled subsets for one seed")
    p.add_argument("--config", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", help="default: <results_dir>/<name>/splits/<dataset>/seed<k>.json")
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("train", help="train one dataset x method x label ratio x seed")
    p.add_argument("--list-methods", action="store_true", help="print registered methods and exit")
    p.add_argument("--config")
    p.add_argument("--dataset")
    p.add_argument("--method")
    p.add_argument("--labels", type=float, help="labeled fraction, e.g. 0.05")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory")
    p.add_argument("--iterations", type=int, help="override datasets.<name>.train.iterations")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method hyperparameter, or train.KEY of the dataset's "
                        "training config (repeatable)")
    p.add_argument("--force", action="store_true", help="retrain a finished run from scratch")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set metrics of one finished run -> metrics.json")
    p.add_argument("--config", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--run", required=True, help="run directory written by agcl train")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int)
    p.add_argument("--save-predictions", action="store_true",
                   help="also write predictions.npz (label maps per test case, for the report)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("aggregate", help="every run's metrics.json -> tidy CSV tables")
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="default: <results_dir>/<name>/summary")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("report", help="tables + plots -> <reports_dir>/<name>/index.html")
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="default: <reports_dir>/<name>/index.html")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one clear line for users; the traceback with --debug
        if args.debug:
            raise
        print(f"agcl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
