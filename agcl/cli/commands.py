"""The `agcl` subcommands: each turns parsed arguments into one stage's work (heavy imports stay
inside, so `agcl --help` and the planning commands load fast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agcl.data.specs import get_spec


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _load_checked_config(paths: list[str]) -> dict:
    """The config file(s), layered in order, validated by the schema and against the method and
    net registries."""
    from agcl.config import load_config
    from agcl.config.checks import check_config

    config = load_config(*paths)
    check_config(config, source=" + ".join(paths))
    return config


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
    summary = ingest_crag(args.path, args.dest, expected_train=train, expected_test=test,
                          max_member_bytes=int(args.max_member_mb * 2**20))
    counts = summary["counts"]
    print(f"CRAG: {counts['train']} train + {counts['test']} test images in {args.dest}")


def cmd_synth(args) -> None:
    from agcl.data import synth

    kwargs = {}
    if args.config:
        from agcl.config import dataset_config, load_config

        kwargs = dict(dataset_config(load_config(*args.config), args.dataset).get("synth", {}))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if args.zip and get_spec(args.dataset).synth_zip:  # ignored where no zip exists
        kwargs["as_zip"] = True
    out = synth.SYNTHESIZERS[args.dataset](args.out, seed=args.seed, **kwargs)
    print(f"synthetic {args.dataset} written to {out}")


def cmd_preprocess(args) -> None:
    from agcl.data.preprocess import preprocess

    scale = args.scale
    if args.config:
        from agcl.config import dataset_config, load_config

        scale = dataset_config(load_config(*args.config), args.dataset)["scale"]
    index = preprocess(args.dataset, args.src, args.out, scale=scale or 1.0)
    print(f"{args.dataset}: {len(index['items'])} items indexed in {args.out}")


def cmd_splits(args) -> None:
    from agcl.common.utils import write_json
    from agcl.config import Layout, dataset_config, load_config
    from agcl.data.preprocess import load_index
    from agcl.data.splits import make_splits

    config = load_config(*args.config)
    layout = Layout(config)
    dcfg = dataset_config(config, args.dataset)
    ratios = list(config["ratios"]) + ([1.0] if config["full_supervision"] else [])
    index = load_index(layout.processed(args.dataset))
    split = make_splits(index, ratios, args.seed, val_cases=dcfg["val_cases"])
    out = Path(args.out) if args.out else layout.splits(args.dataset, args.seed)
    # Same split, same file (and mtime): a config edit that does not change the split does not
    # make every run that reads it look out of date to Snakemake.
    if not (out.is_file() and json.loads(out.read_text()) == json.loads(json.dumps(split))):
        write_json(out, split)
    counts = ", ".join(f"{r}: {e['n']}" for r, e in split["labeled"].items())
    print(f"{args.dataset} seed {args.seed}: labeled {split['unit']}s per ratio {counts} -> {out}")


def cmd_methods(args) -> None:
    from agcl.methods.registry import failed_plugins, get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"{name:14s} {doc[0] if doc else ''}".rstrip())
    for why in failed_plugins().values():
        print(f"not loaded: {why}", file=sys.stderr)


def parse_overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs; values are parsed as YAML scalars (numbers, bools, lists)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got '{pair}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_train(args) -> None:
    from agcl.config.recipe import describe_plan, resolve_recipe, stage_plan
    from agcl.engine.trainer import Trainer

    _set_threads(args.threads)
    config, overrides = _load_checked_config(args.config), parse_overrides(args.set)
    # What the run will do, before anything is loaded (the recipe is config arithmetic).
    recipe = resolve_recipe(config, args.dataset, args.method, overrides=overrides,
                            iterations=args.iterations, ratio=args.labels)
    plan = stage_plan(config, args.dataset, args.method, recipe, overrides=overrides,
                      iterations=args.iterations, ratio=args.labels)
    print(f"{args.method} on {args.dataset} r{args.labels:g} s{args.seed}: {describe_plan(plan)}",
          flush=True)
    trainer = Trainer(config, args.dataset, args.method, args.labels, args.seed, args.out,
                      iterations=args.iterations, device=args.device, overrides=overrides,
                      force=args.force, progress=not args.no_progress)
    meta = trainer.run()
    skipped = (f"; {meta['skipped_steps']} of them SKIPPED as non-finite (steps "
               f"{', '.join(map(str, meta['skipped_step_numbers']))}; run.json)"
               if meta["skipped_steps"] else "")
    print(f"trained {meta['method']} on {meta['dataset']} r{args.labels:g} s{args.seed}: "
          f"{meta['iterations']} iterations in {meta['train_seconds']:.1f} s{skipped} -> "
          f"{trainer.out}")


def cmd_evaluate(args) -> None:
    from agcl.config import Layout
    from agcl.eval.evaluate import evaluate_run

    config = _load_checked_config(args.config)
    if args.run is None:
        identity = (args.method, args.labels, args.seed)
        if any(v is None for v in identity):
            raise SystemExit("agcl evaluate: error: give --run RUN_DIR, or --method, --labels and "
                             "--seed to use the config's run folder")
        args.run = Layout(config).run(args.dataset, *identity)
    _set_threads(args.threads)
    summary = evaluate_run(config, args.dataset, args.run, device=args.device,
                           save_predictions=args.save_predictions)
    fg = summary["foreground_mean"]
    print(f"{args.run}: Dice {fg['dice']:.4f} Jaccard {fg['jaccard']:.4f} "
          f"HD95 {fg['hd95']:.2f} ASD {fg['asd']:.2f} ({summary['protocol']['units']})")


def cmd_aggregate(args) -> None:
    from agcl.config import load_config
    from agcl.report.aggregate import aggregate

    tables = aggregate(load_config(*args.config), out_dir=args.out)
    print(f"aggregated {tables['n_runs']} runs ({tables['n_missing']} missing) -> {tables['out_dir']}")


def cmd_report(args) -> None:
    from agcl.config import load_config
    from agcl.report.render import render_report

    path = render_report(load_config(*args.config), out=args.out)
    print(f"report written to {path}")


def cmd_plan(args) -> None:
    from agcl.config import load_config
    from agcl.report.plan import render

    print(render(load_config(*args.config), args.config, throughput_path=args.throughput,
                 snakefile=args.snakefile))
