"""The segmentation metrics, each described once: how it is named in tables and text, which way
is better, its unit and scale, and whether the paired statistics compare runs on it. Evaluation
computes the metrics named here (agcl.eval.metrics), and every table, plot and statistic of the
report reads their names, titles and directions from this table, so a metric is added here (and
computed in agcl.eval.metrics), nowhere else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    title: str  # column title of the report's tables
    short: str  # in plot axes and the statistics table
    word: str  # in prose (agcl plan)
    higher_is_better: bool
    scale: float  # to the unit shown (Dice x100: percent / points)
    unit: str  # appended to a shown difference
    distance: bool  # a surface distance (undefined on an empty mask; voxels or mm)
    smallest_effect: float  # default of stats.smallest_effect (in the metric's own scale)
    compared: bool  # in the paired statistics and the forest plot


TABLE: dict[str, Metric] = {m.name: m for m in (
    Metric("dice", "DSC %", "DSC", "Dice", True, 100.0, " pts", False, 0.01, True),
    Metric("jaccard", "Jaccard %", "Jaccard", "Jaccard", True, 100.0, " pts", False, 0.01, False),
    Metric("hd95", "HD95", "HD95", "HD95", False, 1.0, "", True, 1.0, True),
    Metric("asd", "ASD", "ASD", "ASD", False, 1.0, "", True, 0.5, False),
)}
METRICS = tuple(TABLE)  # per case and class, in every metrics.json
COMPARED = tuple(name for name, m in TABLE.items() if m.compared)
DISTANCES = tuple(name for name, m in TABLE.items() if m.distance)
LOWER_IS_BETTER = frozenset(name for name, m in TABLE.items() if not m.higher_is_better)


def points_label(metric: Metric) -> str:
    """'DSC (points)' for a percentage metric, else its short name."""
    return f"{metric.short} (points)" if metric.scale == 100.0 else metric.short
