"""Forest plot of the paired differences (stats.csv), every panel reading "better to the right".

One panel per label ratio (rows) x dataset and metric (columns); in each, one line per
comparison "method − reference": the primary interval on this test set (dark bar), the
new-patients interval behind it (thick light bar), the per-seed mean differences (grey dots) and
the mean (the mark: filled red when Holm rejects, open red when only the unadjusted interval
clears 0, blue otherwise; agcl.report.stats.mark, so a mark never contradicts its bar). Where
run-to-run twins were trained, their per-seed twin − method differences are drawn as a line of
their own on the same scale (crosses). Dice in percentage points; HD95 as a reduction
(reference − method), so right is better in every panel. A pair compared both ways is drawn once.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from agcl.eval.metric_table import TABLE
from agcl.report.figures import to_png
from agcl.report.stats import better_sign, mark, parse_seed_diffs

# metric: (axis title, scale to the drawn unit)
FOREST_METRICS = {
    name: (f"{m.short} difference (points), better →" if m.higher_is_better
           else f"{m.short} reduction, better →", m.scale)
    for name, m in TABLE.items() if m.compared}
MARK_STYLE = {"holm": {"color": "#b2182b", "mfc": "#b2182b"},
              "unadjusted": {"color": "#b2182b", "mfc": "white"},
              "none": {"color": "#2166ac", "mfc": "#2166ac"}}


def comparison_label(method: str, reference: str) -> str:
    return f"{method} − {reference}"


def _oriented(low, high, factor: float) -> tuple[float, float] | None:
    if pd.isna(low) or pd.isna(high):
        return None
    a, b = low * factor, high * factor
    return min(a, b), max(a, b)


def forest_plot(stats: pd.DataFrame, run_to_run: pd.DataFrame, datasets: list[str],
                order=None) -> str | None:
    """The figure as a base64 PNG, or None without comparisons. `order` sorts method names."""
    if stats.empty:
        return None
    shown = stats[stats["metric"].isin(FOREST_METRICS)]
    if shown.empty:
        return None
    datasets = [d for d in datasets if d in set(shown["dataset"])]
    metrics = [m for m in FOREST_METRICS if m in set(shown["metric"])]
    ratios = sorted(shown["ratio"].unique())
    key = order or (lambda m: m)
    pairs = []
    for pair in sorted({(r, m) for r, m in zip(shown["reference"], shown["method"])},
                       key=lambda p: (key(p[0]), key(p[1]))):
        if pair[::-1] not in pairs:  # b − a mirrors a − b: drawn once
            pairs.append(pair)
    twins = run_to_run[run_to_run["metric"].isin(metrics)] if len(run_to_run) else run_to_run
    twin_pairs = sorted({(t, m) for t, m in zip(twins["twin"], twins["method"])}) \
        if len(twins) else []
    labels = ([comparison_label(m, r) for r, m in pairs]
              + [f"run-to-run: {t} − {m}" for t, m in twin_pairs])
    y_of = {p: i for i, p in enumerate(pairs)}
    y_twin = {p: len(pairs) + i for i, p in enumerate(twin_pairs)}
    columns = [(d, m) for d in datasets for m in metrics]
    fig, axes = plt.subplots(len(ratios), len(columns), squeeze=False, sharey=True,
                             figsize=(2.5 * len(columns) + 1.6, 0.2 * len(labels) * len(ratios)
                                      + 0.8 * len(ratios) + 0.3))
    for row, ratio in enumerate(ratios):
        for col, (dataset, metric) in enumerate(columns):
            ax = axes[row, col]
            title, scale = FOREST_METRICS[metric]
            factor = scale * better_sign(metric)
            part = shown[(shown["dataset"] == dataset) & (shown["ratio"] == ratio)
                         & (shown["metric"] == metric)]
            ax.axvline(0, color="#444", lw=0.8, zorder=1)
            for rec in part.to_dict("records"):
                y = y_of.get((rec["reference"], rec["method"]))
                if y is None:
                    continue
                seeds = np.array(list(parse_seed_diffs(rec["seed_diffs"]).values())) * factor
                ax.scatter(seeds, np.full(seeds.size, y + 0.25), s=5, color="#888", zorder=2,
                           lw=0)
                new = _oriented(rec.get("np_low"), rec.get("np_high"), factor)
                if new is not None:
                    ax.hlines(y, *new, color="#92c5de", lw=5, alpha=0.6, zorder=2)
                primary = _oriented(rec["ci_low"], rec["ci_high"], factor)
                if primary is not None:
                    ax.hlines(y, *primary, color="#2166ac", lw=1.6, zorder=3)
                state = mark(rec["p_holm"], rec["ci_low"], rec["ci_high"])
                ax.plot(rec["mean_diff"] * factor, y, "o", ms=4.5, zorder=4, mew=1.2,
                        **MARK_STYLE[state])
            if len(twins):
                part = twins[(twins["dataset"] == dataset) & (twins["ratio"] == ratio)
                             & (twins["metric"] == metric)]
                for rec in part.to_dict("records"):
                    values = np.array(list(parse_seed_diffs(rec["seed_diffs"]).values()))
                    ax.scatter(values * factor, np.full(values.size, y_twin[(rec["twin"],
                                                                            rec["method"])]),
                               s=14, marker="x", color="#8c510a", lw=0.8, zorder=2)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_ylim(len(labels) - 0.4, -0.6)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="y", visible=False)
            if row == 0:
                ax.set_title(f"{dataset.upper()} {metric.upper()}", fontsize=8)
            if row == len(ratios) - 1:
                ax.set_xlabel(title, fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{100 * ratio:g}% labels", fontsize=8)
    fig.tight_layout(pad=0.4, w_pad=0.6, h_pad=0.6)
    return to_png(fig)
