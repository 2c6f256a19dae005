"""Summary tables -> one self-contained HTML page (Jinja2 + seaborn, images embedded)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on clusters and in CI
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from jinja2 import Environment, PackageLoader, select_autoescape

from agcl.config import Layout
from agcl.report.aggregate import METRICS
from agcl.utils import code_version, write_text


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `agcl aggregate` first")
    return pd.read_csv(path)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def dice_plot(runs: pd.DataFrame) -> str | None:
    """Foreground Dice per method and label ratio, one panel per dataset, points = seeds."""
    if runs.empty:
        return None
    data = runs.assign(labels=runs["ratio"].map(lambda r: f"{100 * r:g}%"))
    grid = sns.catplot(data=data, x="labels", y="dice", hue="method", col="dataset", kind="bar",
                       errorbar="sd", height=3.2, aspect=1.1, sharey=False)
    grid.map_dataframe(sns.stripplot, x="labels", y="dice", hue="method", dodge=True,
                       palette="dark:black", size=3, legend=False)
    grid.set_axis_labels("labeled fraction", "Dice (mean over test cases)")
    return _png(grid.figure)


def _fmt(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_rows(summary: pd.DataFrame) -> list[dict]:
    rows = []
    for rec in summary.sort_values(["dataset", "ratio", "method"]).to_dict("records"):
        row = {"dataset": rec["dataset"], "method": rec["method"],
               "labels": f"{100 * rec['ratio']:g}%", "n_seeds": int(rec["n_seeds"])}
        for m in METRICS:
            scale, digits = (100, 2) if m in ("dice", "jaccard") else (1, 2)
            row[m] = _fmt(rec[f"{m}_mean"] * scale, rec[f"{m}_std"] * scale, digits)
        rows.append(row)
    return rows


def render_report(config: dict, out: str | Path | None = None, root: str | Path = ".") -> Path:
    layout = Layout(config, root)
    tables = layout.results / "summary"
    summary, runs, missing = (_read(tables / f"{n}.csv") for n in ("summary", "runs", "missing"))
    env = Environment(loader=PackageLoader("agcl.report", "templates"),
                      autoescape=select_autoescape(["html"]))
    html = env.get_template("index.html.j2").render(
        name=config["name"],
        rows=summary_rows(summary),
        dice_plot=dice_plot(runs),
        missing=missing.to_dict("records"),
        selection=sorted(runs["selection"].dropna().unique()) if not runs.empty else [],
        units=sorted(runs["units"].dropna().unique()) if not runs.empty else [],
        code_versions=sorted(runs["code_version"].dropna().unique()) if not runs.empty else [],
        report_code_version=code_version(),
        seeds=config["seeds"],
        config_json=json.dumps(config, indent=2, sort_keys=True),
    )
    out = Path(out) if out else layout.report / "index.html"
    write_text(out, html)
    return out
