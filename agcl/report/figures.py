"""The report's figures, each returned as a base64 PNG so the HTML page stays self-contained."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on clusters and in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from agcl.data.loaders import load_cases
from agcl.data.specs import get_spec
from agcl.report.intervals import fixed_set_interval
from agcl.runtime.runfolder import PREDICTIONS

sns.set_theme(style="whitegrid", context="paper")


def to_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _labels(ratio: float) -> str:
    return f"{100 * ratio:g}%"


def label_efficiency(runs: pd.DataFrame, methods: list[str], datasets: list[str]) -> str | None:
    """Dice vs labeled fraction, one line per method through the mean over seeds, each seed's
    run as a small point, and the interval the statistics use for a mean over seeds on this test
    set (agcl.report.intervals.fixed_set_interval: t at 3-5 seeds, sign-flip inversion from 6,
    nothing below 3)."""
    if runs.empty:
        return None
    shown = [d for d in datasets if d in set(runs["dataset"])]
    palette = dict(zip(methods, sns.color_palette(n_colors=max(len(methods), 1))))
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown) + 1.2, 3.2), squeeze=False)
    ticks = sorted(runs["ratio"].unique())
    for ax, dataset in zip(axes[0], shown):
        part = runs[runs["dataset"] == dataset]
        offsets = np.linspace(-0.04, 0.04, max(len(methods), 1))
        for offset, method in zip(offsets, methods):
            mine = part[part["method"] == method]
            if mine.empty:
                continue
            color = palette[method]
            means, xs = [], []
            for ratio, group in mine.groupby("ratio", sort=True):
                values = group["dice"].to_numpy(dtype=float)
                x = ratio * 10 ** offset  # spread methods apart on the log axis
                ax.scatter(np.full(values.size, x), values, s=7, color=color, alpha=0.5, lw=0)
                low, high = fixed_set_interval(values)[:2]
                if not (np.isnan(low) or np.isnan(high)):
                    ax.vlines(x, low, high, color=color, lw=1.2)
                means.append(values.mean())
                xs.append(x)
            ax.plot(xs, means, "o-", color=color, ms=4, lw=1.2, label=method)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [_labels(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(dataset)
        ax.set_xlabel("labeled fraction")
        ax.set_ylabel("Dice (test mean per run)")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=7)
    fig.tight_layout()
    return to_png(fig)


def per_case_distribution(case_means: pd.DataFrame, methods: list[str],
                          datasets: list[str]) -> str | None:
    """Per-case Dice (mean over classes and seeds) per method, one panel per dataset."""
    if case_means.empty:
        return None
    data = case_means.assign(labels=case_means["ratio"].map(_labels))
    grid = sns.catplot(data=data, x="labels", y="dice", hue="method", hue_order=methods,
                       col="dataset", kind="box", height=3.2,
                       col_order=[d for d in datasets if d in set(case_means["dataset"])], aspect=1.1, sharey=False,
                       fliersize=0)
    grid.map_dataframe(sns.stripplot, x="labels", y="dice", hue="method", hue_order=methods,
                       dodge=True, palette="dark:black", size=2, alpha=0.6, legend=False)
    grid.set_axis_labels("labeled fraction", "Dice per test case")
    return to_png(grid.figure)


def training_curves(logs: pd.DataFrame, methods: list[str], datasets: list[str]) -> str | None:
    """Training loss (and val Dice where logged) per method, mean over seeds, per dataset."""
    if logs.empty:
        return None
    datasets = [d for d in datasets if d in set(logs["dataset"])]
    has_val = "val_dice" in logs and logs["val_dice"].notna().any()
    rows = 2 if has_val else 1
    fig, axes = plt.subplots(rows, len(datasets), figsize=(3.6 * len(datasets), 2.8 * rows),
                             squeeze=False)
    for col, dataset in enumerate(datasets):
        part = logs[logs["dataset"] == dataset]
        sns.lineplot(data=part, x="step", y="loss", hue="method", hue_order=methods,
                     style="labels", errorbar=None, ax=axes[0, col],
                     legend=col == len(datasets) - 1)
        axes[0, col].set_title(dataset)
        if has_val:
            val = part.dropna(subset=["val_dice"]) if "val_dice" in part else part.iloc[:0]
            if val.empty:  # no val set for this dataset (e.g. LA by default)
                axes[1, col].set_visible(False)
                continue
            sns.lineplot(data=val, x="step", y="val_dice", hue="method", hue_order=methods,
                         style="labels", marker="o", errorbar=None, ax=axes[1, col],
                         legend=False)
            axes[1, col].set_ylabel("val Dice")
    if len(datasets):
        legend = axes[0, -1].get_legend()
        if legend is not None:
            sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return to_png(fig)


def _display_slice(image: np.ndarray, label: np.ndarray, dataset: str):
    """A 2D view of a case: the slice with the most foreground along the spec's display_axis
    (3D), or the whole image (2D, e.g. CRAG), its normalisation undone where the spec records it."""
    spec = get_spec(dataset)
    axis = spec.display_axis
    if axis is None:
        view = image.transpose(1, 2, 0) if image.shape[0] > 1 else image[0]
        if spec.channel_mean is not None:
            view = np.clip(view * np.asarray(spec.channel_std, dtype=np.float32)
                           + np.asarray(spec.channel_mean, dtype=np.float32), 0, 1)
        return view, label, (slice(None), slice(None))
    counts = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    index = int(np.argmax(counts))
    take = [slice(None)] * 3
    take[axis] = index
    view = image[0][tuple(take)]
    return view, label[tuple(take)], tuple(take)


def qualitative_overlays(case_means: pd.DataFrame, dataset: str, ratio: float,
                         run_dirs: dict[str, Path], processed_dir: Path,
                         rank_method: str) -> str | None:  # columns follow run_dirs' order
    """Image, ground truth and each method's prediction for the best, median and worst case.

    Cases are ranked by `rank_method`'s per-case Dice; predictions are those of seed-0 runs
    (predictions.npz written by `agcl evaluate --save-predictions`).
    """
    ranked = case_means[(case_means["dataset"] == dataset) & (case_means["ratio"] == ratio)
                        & (case_means["method"] == rank_method)].sort_values("dice")
    predictions = {}
    for method, run in run_dirs.items():
        path = run / PREDICTIONS
        if path.exists():
            predictions[method] = np.load(path)
    if ranked.empty or not predictions:
        return None
    picks = {"worst": ranked.iloc[0]["case"], "median": ranked.iloc[len(ranked) // 2]["case"],
             "best": ranked.iloc[-1]["case"]}
    cases = {c.case_id: c for c in load_cases(processed_dir, list(dict.fromkeys(picks.values())))}
    columns = ["image", "ground truth", *predictions]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.1 * len(columns), 6.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, (kind, case_id) in enumerate(picks.items()):
        case = cases[case_id]
        view, truth, take = _display_slice(case.image, case.label, dataset)
        gray = view if view.ndim == 3 else (view - view.min()) / (np.ptp(view) + 1e-8)
        panels = [None, truth] + [predictions[m][case_id][take] if case_id in predictions[m]
                                  else None for m in predictions]
        for col, (title, mask) in enumerate(zip(columns, panels)):
            ax = axes[row, col]
            ax.imshow(gray, cmap="gray" if gray.ndim == 2 else None)
            if mask is not None:
                overlay = np.ma.masked_where(mask == 0, mask)
                ax.imshow(overlay, cmap=cmap, alpha=0.45, vmin=0, vmax=9, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{kind}\n{case_id}", fontsize=7)
    fig.tight_layout()
    return to_png(fig)


ANCHOR_PREFIX = "anchors_class"


def agcl_curves(logs: pd.DataFrame, datasets: list[str], method: str) -> str | None:
    """Semi-AGCL's own training signals of `method` (the config's method of interest), where its
    train_log.csv has them: anchors per class per step (columns anchors_class0..K-1) and the
    fraction of the queue filled (queue_fill, 0..1), mean over seeds, one column of panels per
    dataset. None when no run logged either."""
    if logs.empty or "method" not in logs:
        return None
    part = logs[logs["method"] == method]
    anchor_cols = sorted((c for c in part.columns if c.startswith(ANCHOR_PREFIX)
                          and part[c].notna().any()), key=lambda c: int(c[len(ANCHOR_PREFIX):]))
    has_queue = "queue_fill" in part and part["queue_fill"].notna().any()
    if not anchor_cols and not has_queue:
        return None
    datasets = [d for d in datasets if d in set(part["dataset"])]
    panels = [p for p, on in (("anchors", bool(anchor_cols)), ("queue", has_queue)) if on]
    fig, axes = plt.subplots(len(panels), len(datasets), squeeze=False,
                             figsize=(3.6 * len(datasets), 2.6 * len(panels)))
    for col, dataset in enumerate(datasets):
        data = part[part["dataset"] == dataset]
        for row, panel in enumerate(panels):
            ax = axes[row, col]
            if panel == "anchors":
                cols = [c for c in anchor_cols if data[c].notna().any()]
                long = data.melt(id_vars=["step", "labels", "seed"], value_vars=cols,
                                 var_name="class", value_name="anchors").dropna()
                long["class"] = long["class"].str[len(ANCHOR_PREFIX):]
                if long.empty:
                    ax.set_visible(False)
                    continue
                sns.lineplot(data=long, x="step", y="anchors", hue="class", style="labels",
                             errorbar=None, ax=ax, legend=col == len(datasets) - 1)
                ax.set_ylabel("anchors per class")
                ax.set_title(f"{dataset}: {method}")
            else:
                queue = data.dropna(subset=["queue_fill"])
                if queue.empty:
                    ax.set_visible(False)
                    continue
                sns.lineplot(data=queue, x="step", y="queue_fill", style="labels", errorbar=None,
                             ax=ax, legend=False)
                ax.set_ylim(0, 1.05)
                ax.set_ylabel("queue filled")
    legend = axes[0, -1].get_legend()
    if legend is not None:
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return to_png(fig)
