"""pcpo-eval's report: every policy and metric in the tables, numbers as documented, NaN as "–", valid PNGs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pcpo_hydra.evaluation.report import FOREST, MISSING, markdown_table, write_report
from pcpo_hydra.evaluation.statistics import MODEL_COLUMNS

POLICIES = ["base", "grpo", "pcpo"]
METRICS = ["fid", "fd_dinov2", "inception_score", "lpips_diversity", "hps_mean", "all nan"]


@pytest.fixture
def overall() -> pd.DataFrame:
    return pd.DataFrame({
        "policy": POLICIES, "n_prompts": [40, 40, 40], "n_images": [160, 160, 160],
        "fid": [math.nan, 23.4567, 20.1], "fd_dinov2": [math.nan, 310.25, 298.0],
        "inception_score": [5.12345, 5.3, 5.5], "inception_score_std": [0.1, 0.2, 0.15],
        "lpips_diversity": [0.61234, 0.58, 0.55], "hps_mean": [0.25, 0.27, 0.281], "hps_std": [0.01, 0.012, 0.011],
        "all nan": [math.nan] * 3,
    })


@pytest.fixture
def models() -> pd.DataFrame:
    return pd.DataFrame([
        ["hps_mean", "grpo", "base", 0.02, 0.004, 1.234e-7, 40, True],
        ["hps_mean", "pcpo", "base", 0.031, 0.0041, 3e-15, 40, True],
        ["fid", "pcpo", "grpo (base has no values)", -3.3567, math.nan, math.nan, 40, False],
    ], columns=MODEL_COLUMNS)


def write(tmp_path: Path, overall: pd.DataFrame, models: pd.DataFrame) -> tuple[Path, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-NaN metric or a NaN error bar must not make matplotlib complain
        report = write_report(tmp_path / "report", "GRPO vs PCPO", overall, models, "per_prompt.csv",
                              ["checkpoints matched at eval/reward_mean 0.27", "reference: the base model's images"])
    return report, report.read_text()


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows that start with `first_cell`."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return [row for row in rows if row[0] == first_cell]


def test_the_report_holds_every_policy_and_metric_formatted(tmp_path: Path, overall: pd.DataFrame,
                                                            models: pd.DataFrame) -> None:
    report, text = write(tmp_path, overall, models)
    assert report == tmp_path / "report" / "report.md"
    assert text.startswith("# GRPO vs PCPO\n\nCompared **base**, **grpo**, **pcpo** on 40 prompts and 160 images per policy.")
    assert table_rows(text, "policy") == [["policy", "n_prompts", "n_images", *overall.columns[3:]]]
    assert table_rows(text, "base") == [["base", "40", "160", MISSING, MISSING, "5.123", "0.1", "0.6123", "0.25", "0.01", MISSING]]
    assert table_rows(text, "grpo") == [["grpo", "40", "160", "23.46", "310.2", "5.3", "0.2", "0.58", "0.27", "0.012", MISSING]]
    assert table_rows(text, "hps_mean") == [["hps_mean", "grpo", "base", "0.02 ± 0.004", "1.23e-07", "40", "yes"],
                                            ["hps_mean", "pcpo", "base", "0.031 ± 0.0041", "3.00e-15", "40", "yes"]]
    assert table_rows(text, "fid") == [["fid", "pcpo", "grpo (base has no values)", f"-3.357 ± {MISSING}", MISSING, "40", "no"]]
    assert "[per_prompt.csv](per_prompt.csv)" in text
    assert "- checkpoints matched at eval/reward_mean 0.27\n- reference: the base model's images\n" in text
    for metric in METRICS:
        assert f"({metric.replace(' ', '_')}.png)" in text
    assert f"({FOREST})" in text


def test_the_plots_are_valid_pngs_one_per_metric_and_the_forest_plot(tmp_path: Path, overall: pd.DataFrame,
                                                                    models: pd.DataFrame) -> None:
    report, _ = write(tmp_path, overall, models)
    names = sorted(path.name for path in report.parent.glob("*.png"))
    assert names == sorted([f"{metric.replace(' ', '_')}.png" for metric in METRICS] + [FOREST])
    for name in names:
        with Image.open(report.parent / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


def test_without_mixed_models_or_counts_the_report_leaves_them_out(tmp_path: Path, overall: pd.DataFrame) -> None:
    """One policy: nothing to compare it with; an overall table indexed by policy serves as well."""
    single = overall.drop(columns=["n_prompts", "n_images"]).iloc[:1].set_index("policy")
    report, text = write(tmp_path, single, pd.DataFrame(columns=MODEL_COLUMNS))
    assert "Compared **base**.\n" in text and "## Mixed models" not in text
    assert not (report.parent / FOREST).exists()


def test_markdown_table_pads_columns_and_escapes_bars() -> None:
    assert markdown_table(["a", "metric"], [["long cell", "1"], ["x|y", MISSING]]) == (
        "| a         | metric |\n"
        "| --------- | ------ |\n"
        "| long cell | 1      |\n"
        f"| x\\|y      | {MISSING}      |")
