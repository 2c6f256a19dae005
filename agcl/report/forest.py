"""Forest plot of the paired differences (stats.csv) with the noise floor beside 0.

One panel per label ratio (rows) x dataset and metric (columns); in each, one line per
comparison "method − reference": its mean difference (point), its two-way bootstrap 95 % CI (bar,
where there is one) and its per-seed mean differences (small dots). The vertical line is 0; the
shaded band around it is ± the largest |twin − method| difference of the noise floor (float
noise at this scale), absent when none was measured. Dice is drawn in percentage points; a pair
compared both ways (b − a mirrors a − b) is drawn once.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from agcl.report.figures import to_png
from agcl.report.noise import noise_band
from agcl.report.stats import parse_seed_diffs

FOREST_METRICS = {"dice": ("DSC diff (points)", 100.0), "hd95": ("HD95 diff", 1.0)}


def comparison_label(method: str, reference: str) -> str:
    return f"{method} − {reference}"


def forest_plot(stats: pd.DataFrame, noise: pd.DataFrame, datasets: list[str],
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
    labels = [comparison_label(m, r) for r, m in pairs]
    y_of = {p: i for i, p in enumerate(pairs)}
    band = noise_band(noise)
    columns = [(d, m) for d in datasets for m in metrics]
    fig, axes = plt.subplots(len(ratios), len(columns), squeeze=False, sharey=True,
                             figsize=(2.3 * len(columns) + 1.2, 0.18 * len(pairs) * len(ratios)
                                      + 0.8 * len(ratios) + 0.3))
    for row, ratio in enumerate(ratios):
        for col, (dataset, metric) in enumerate(columns):
            ax = axes[row, col]
            title, scale = FOREST_METRICS[metric]
            part = shown[(shown["dataset"] == dataset) & (shown["ratio"] == ratio)
                         & (shown["metric"] == metric)]
            half = band.get((dataset, round(float(ratio), 6), metric))
            if half is not None:
                ax.axvspan(-half * scale, half * scale, color="#f4a582", alpha=0.45, lw=0,
                           zorder=0)
            ax.axvline(0, color="#444", lw=0.8, zorder=1)
            for rec in part.to_dict("records"):
                y = y_of.get((rec["reference"], rec["method"]))
                if y is None:
                    continue
                seeds = np.array(list(parse_seed_diffs(rec["seed_diffs"]).values())) * scale
                ax.scatter(seeds, np.full(seeds.size, y + 0.22), s=5, color="#999", zorder=2,
                           lw=0)
                if not (pd.isna(rec["ci_low"]) or pd.isna(rec["ci_high"])):
                    ax.hlines(y, rec["ci_low"] * scale, rec["ci_high"] * scale, color="#2166ac",
                              lw=1.6, zorder=3)
                significant = not pd.isna(rec["p_holm"]) and rec["p_holm"] < 0.05
                ax.plot(rec["mean_diff"] * scale, y, "o", ms=4, zorder=4,
                        color="#b2182b" if significant else "#2166ac")
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_ylim(len(labels) - 0.4, -0.6)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="y", visible=False)
            if row == 0:
                ax.set_title(f"{dataset.upper()} {title}", fontsize=8)
            if row == len(ratios) - 1:
                ax.set_xlabel(title, fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{100 * ratio:g}% labels", fontsize=8)
    fig.tight_layout(pad=0.4, w_pad=0.6, h_pad=0.6)
    return to_png(fig)
