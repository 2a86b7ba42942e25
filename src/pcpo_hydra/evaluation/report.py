"""pcpo-eval's report: one markdown page with the overall table, the mixed models and their plots.

Plots are drawn on matplotlib `Figure`s, not pyplot: PNGs are written with the Agg canvas and no
global backend or open-figure state is touched, so a report can be written from any process.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

REPORT = "report.md"
FOREST = "effects.png"
MISSING = "–"  # a NaN in a table: a metric that does not apply (fidelity of the reference to itself)
COUNTS = ("n_prompts", "n_images")  # overall's columns that describe the comparison, not a metric
ERROR_SUFFIXES = ("_std", "_se")


def write_report(out: Path, title: str, overall: pd.DataFrame, models: pd.DataFrame, per_prompt_csv: str,
                 notes: list[str]) -> Path:
    """Write `out/report.md` and its PNGs (a bar chart per metric, the effects' forest plot); return the report's path.

    `overall`: one row per policy (a `policy` column, else the index), a numeric column per metric; a
    `<metric>_std` or `<metric>_se` column (for `<name>_mean`, also `<name>_std`) gives its bars'
    error bars, and `n_prompts` / `n_images` columns, when present, are stated in the opening line.
    `models`: mixed_models' table. `per_prompt_csv`: the per-prompt table's path, linked as given.
    Numbers show 4 significant digits, p-values in scientific notation, NaN as "–".
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overall = overall.set_index("policy") if "policy" in overall.columns else overall
    metrics = [c for c in overall.select_dtypes("number").columns if c not in COUNTS and not c.endswith(ERROR_SUFFIXES)]
    plots = [_bar_chart(out, overall, metric) for metric in metrics]
    if not models.empty:
        plots.append(_forest_plot(out, models))
    lines = [f"# {title}", "", _compared(overall), "", "## Overall", "",
             markdown_table(["policy", *overall.columns],
                            [list(map(_number, row)) for row in overall.itertuples(name=None)])]
    if not models.empty:
        lines += ["", "## Mixed models", "",
                  "Effect of each policy against the baseline ± standard error, prompt as random intercept (REML).",
                  "", markdown_table(["metric", "policy", "baseline", "effect ± SE", "p-value", "prompts", "converged"],
                                     [_model_row(row) for row in models.itertuples()])]
    lines += ["", f"Per-prompt table: [{Path(per_prompt_csv).name}]({per_prompt_csv})", "", "## Plots", ""]
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    report = out / REPORT
    report.write_text("\n".join(lines) + "\n")
    return report


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table of already formatted cells, columns padded to line up in plain text."""
    cells = [[cell.replace("|", "\\|") for cell in row] for row in (header, *rows)]  # a "|" would end the cell
    widths = [max(len(cell) for cell in column) for column in zip(*cells)]
    lines = [cells[0], ["-" * width for width in widths], *cells[1:]]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |"
                     for line in lines)


def _number(value: Any, digits: int = 4) -> str:
    """`digits` significant digits, integers whole; NaN or None as MISSING; anything else as str()."""
    if isinstance(value, numbers.Integral):  # numpy's integers too
        return str(int(value))
    if isinstance(value, numbers.Real):
        return MISSING if math.isnan(value) else f"{value:.{digits}g}"
    return MISSING if value is None else str(value)


def _model_row(row: Any) -> list[str]:
    """One mixed-model row of the report: effect ± SE, and the p-value in scientific notation."""
    p_value = MISSING if math.isnan(row.p_value) else f"{row.p_value:.2e}"
    return [row.metric, row.policy, row.baseline, f"{_number(row.effect)} ± {_number(row.std_error, 2)}", p_value,
            str(row.n_prompts), "yes" if row.converged else "no"]


def _compared(overall: pd.DataFrame) -> str:
    """The opening line: which policies, on how many prompts and images (a range where policies differ)."""
    counts = []
    for column in (c for c in COUNTS if c in overall.columns):
        low, high = overall[column].min(), overall[column].max()
        span = _number(low) if low == high else f"{_number(low)}–{_number(high)}"
        counts.append(f"{span} {column.removeprefix('n_')}")
    policies = ", ".join(f"**{policy}**" for policy in overall.index)
    return f"Compared {policies}" + (f" on {' and '.join(counts)} per policy" if counts else "") + "."


def _error_column(overall: pd.DataFrame, metric: str) -> str | None:
    """The column of `metric`'s error bars, or None: `<metric>_std`/`_se`, or `<name>_std`/`_se` for `<name>_mean`."""
    stems = [metric, metric.removesuffix("_mean")] if metric.endswith("_mean") else [metric]
    return next((stem + suffix for stem in stems for suffix in ERROR_SUFFIXES if stem + suffix in overall.columns),
                None)


def _png(out: Path, name: str) -> Path:
    """A PNG path in `out` for a metric name, whatever characters the name holds."""
    return out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")


def _bar_chart(out: Path, overall: pd.DataFrame, metric: str) -> Path:
    """One bar per policy, with error bars where the metric has a spread column."""
    from matplotlib.figure import Figure

    error = _error_column(overall, metric)
    values = overall[metric].astype(float)
    figure = Figure(figsize=(max(3.0, 1.2 * len(overall)), 3.2), layout="constrained")
    axes = figure.subplots()
    positions = range(len(overall))  # not the names: matplotlib drops a named category whose bar is NaN
    axes.bar(positions, values, yerr=None if error is None else overall[error].astype(float), capsize=4)
    axes.set_xticks(positions, [str(p) for p in overall.index])
    for position in (i for i, value in enumerate(values) if math.isnan(value)):
        axes.annotate("no value", (position, 0.0), xytext=(0, 4), textcoords="offset points", ha="center",
                      color="grey")
    axes.set_title(metric + ("" if error is None else f" (± {error})"))
    axes.tick_params(axis="x", labelrotation=30)
    path = _png(out, metric)
    figure.savefig(path, dpi=100)
    return path


def _forest_plot(out: Path, models: pd.DataFrame) -> Path:
    """Each policy's effect against the baseline with its 95% interval (±1.96 SE), one panel per metric."""
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(models["metric"]))
    figure = Figure(figsize=(6.0, 0.6 + 1.2 * len(metrics) + 0.25 * len(models)), layout="constrained")
    for axes, metric in zip(figure.subplots(len(metrics), 1, squeeze=False)[:, 0], metrics):
        rows = models[models["metric"] == metric]
        axes.errorbar(rows["effect"].astype(float), range(len(rows)), xerr=1.96 * rows["std_error"].astype(float),
                      fmt="o", capsize=4)
        axes.axvline(0.0, color="grey", linewidth=0.8)
        axes.set_yticks(range(len(rows)), [str(p) for p in rows["policy"]])
        axes.set_ylim(-0.5, len(rows) - 0.5)
        axes.set_title(f"{metric}: effect vs {rows['baseline'].iloc[0]} (±1.96 SE)", fontsize=9)
    path = out / FOREST
    figure.savefig(path, dpi=100)
    return path
