"""Test-set evaluation of one finished run -> metrics.json (per-case records first, as nnU-Net).

The checkpoint is chosen by the run's recorded selection policy (last, or best on val); the test
set only ever gets scored, never consulted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from agcl.common.components import largest_component_per_class
from agcl.common.utils import atomic_path, code_version, write_json
from agcl.config import ConfigError, Layout, method_eval_config
from agcl.data.loaders import load_cases, read_split
from agcl.data.preprocess import load_index
from agcl.data.specs import SPECS, get_spec
from agcl.eval.metric_table import DISTANCES
from agcl.eval.metric_table import METRICS as METRIC_NAMES
from agcl.eval.metrics import multiclass_metrics
from agcl.eval.object_metrics import object_metrics, to_instances
from agcl.nets import build
from agcl.nets.inference import eval_window, predict_case
from agcl.runtime.devices import resolve_amp, resolve_device
from agcl.runtime.numerics import cpu_numerics
from agcl.runtime.runfolder import BEST, FINAL, METRICS_JSON, PREDICTIONS, RunFolder, RunFolderError

METRICS = METRIC_NAMES  # agcl.eval.metric_table
OBJECT_METRICS = ("object_f1", "object_dice", "object_hausdorff")
def _spacing(dataset: str, unit: str):
    """The physical voxel size (DatasetSpec.spacing_mm) where the processed files still allow one
    (LA); the processed ACDC and CRAG files carry no spacing."""
    if unit == "voxels":
        return None
    spacing = SPECS[dataset].spacing_mm if dataset in SPECS else None
    if spacing is None:
        raise ConfigError(f"datasets.{dataset}.eval.spacing: 'mm' is not available for {dataset} "
                          "(its processed files store no voxel size); use 'voxels'")
    return spacing


def worst_distance(shape, spacing) -> float:
    """Stated worst case for an undefined distance: the diagonal of the case's grid."""
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=float)
    return float(np.sqrt(np.sum((np.asarray(shape) * spacing) ** 2)))


DISTANCE_METRICS = (*DISTANCES, "object_hausdorff")


def aggregated_value(record: dict, metric: str) -> float:
    """A per-case value as aggregates use it: an undefined distance (a mask or object set empty
    on one side only) counts as the case's worst case, the diagonal of its grid."""
    value = record[metric]
    if metric in DISTANCE_METRICS and math.isnan(value):
        return record["worst_distance"]
    return value


def aggregate_records(records: list[dict]) -> dict:
    """Means per class and over foreground classes, from the per-case records."""
    by_class: dict[int, dict[str, list[float]]] = {}
    for rec in records:
        store = by_class.setdefault(rec["class"], {m: [] for m in METRICS})
        for m in METRICS:
            store[m].append(aggregated_value(rec, m))
    mean = {str(k): {m: float(np.mean(v)) for m, v in d.items()} for k, d in sorted(by_class.items())}
    foreground = {m: float(np.mean([mean[k][m] for k in mean])) for m in METRICS}
    out = {"mean": mean, "foreground_mean": foreground}
    with_objects = [r for r in records if "object_f1" in r]
    if with_objects:
        out["object_mean"] = {m: float(np.mean([aggregated_value(r, m) for r in with_objects]))
                              for m in OBJECT_METRICS}
    return out


def evaluate_run(config: dict, dataset: str, run_dir: str | Path, *, device: str | None = None,
                 root: str | Path = ".", save_predictions: bool = False) -> dict:
    folder = RunFolder(run_dir)
    spec = get_spec(dataset)
    layout = Layout(config, root)
    meta = folder.finished_meta()
    eval_cfg = method_eval_config(config, dataset, meta["method"])
    if meta["dataset"] != dataset:
        raise ConfigError(f"{folder.path} holds a {meta['dataset']} run but it is being evaluated "
                          f"as {dataset}: pass {meta['dataset']} as the dataset")
    policy = meta["selection"]
    ckpt_name = BEST if policy == "best_val" else FINAL
    ckpt = folder.load_checkpoint(ckpt_name)
    if ckpt.get("run_id") != meta.get("run_id"):
        raise RunFolderError(f"{folder.file(ckpt_name)} belongs to another training of this run "
                             f"(run_id {ckpt.get('run_id')} vs {meta.get('run_id')} in run.json): "
                             "train it again with --force")
    torch_device = resolve_device(device or config.get("device", "auto"))
    net = build(ckpt["net_name"], ckpt["in_channels"], ckpt["num_classes"], **ckpt["net_kwargs"])
    net.load_state_dict(ckpt["state_dict"])
    net.to(torch_device).eval()
    # Precision and window from the recipe the run trained with (run.json), not the dataset's
    # train block: a train_by_method entry may give a method its own patch or precision.
    recipe = meta["train"]
    amp_dtype = resolve_amp(recipe["amp"], torch_device)

    split = read_split(layout.splits(dataset, meta["seed"]))
    processed = layout.processed(dataset)
    index = load_index(processed)
    patch, stride = eval_window(eval_cfg, recipe["patch"])
    spacing = _spacing(dataset, eval_cfg["spacing"])
    classes = list(range(1, spec.num_classes))

    records, predictions = [], {}
    for case in load_cases(processed, split["test"]):
        pred = predict_case(net, case.image, spec.eval_mode, spec.num_classes, patch, stride,
                            torch_device, eval_cfg["window_batch"], amp_dtype)
        if eval_cfg["largest_component"]:
            pred = largest_component_per_class(pred, spec.num_classes)
        if save_predictions:
            predictions[case.case_id] = pred
        worst = worst_distance(case.label.shape, spacing)
        case_records = multiclass_metrics(pred, case.label, classes, spacing,
                                          eval_cfg["empty_policy"])
        if case.instances is not None:  # CRAG: GlaS object-level metrics on connected components
            objects = object_metrics(to_instances(pred == 1), case.instances)
            case_records[0].update({k: objects[k] for k in OBJECT_METRICS},
                                   n_pred_objects=objects["n_pred"], n_gt_objects=objects["n_gt"])
        for rec in case_records:
            rec.update(case=case.case_id, class_name=spec.class_names[rec["class"] - 1],
                       worst_distance=worst)
            records.append(rec)
    if not records:
        raise ValueError(f"{dataset}: the test split of seed {meta['seed']} is empty")

    summary = {
        "run_id": meta.get("run_id"),
        "dataset": dataset,
        "method": meta["method"],
        "ratio": meta["ratio"],
        "seed": meta["seed"],
        "config_name": config["name"],
        "code_version": code_version(),
        "train_code_version": meta["code_version"],
        "cpu_numerics": cpu_numerics(),
        "selection": {"policy": policy, "checkpoint": ckpt_name, "step": ckpt["step"],
                      "test_used_for_selection": False},
        "protocol": {
            "eval_mode": spec.eval_mode,
            "patch": patch,
            "stride": stride if spec.eval_mode != "slices_2d" else None,
            "largest_component": eval_cfg["largest_component"],
            "empty_policy": eval_cfg["empty_policy"],
            "units": "mm" if spacing else "voxels",
            "resolution": index["resolution"],
            "worst_case_distance": "nan per-case distances (one empty mask) count as the "
                                   "diagonal of the case's grid in aggregates",
            "policy_applied_count": sum(r["policy_applied"] is not None for r in records),
        },
        "metric_per_case": records,
        **aggregate_records(records),
        "config": config,
    }
    # Predictions first: metrics.json is what marks the run evaluated, so it comes last.
    if save_predictions:
        with atomic_path(folder.file(PREDICTIONS)) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, **predictions)
    write_json(folder.file(METRICS_JSON), summary)
    return summary
