"""The mixed models recover a planted policy effect, agree with a paired t-test, and survive degenerate data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.regression.mixed_linear_model import MixedLM
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from pcpo_hydra.evaluation.statistics import MODEL_COLUMNS, mixed_models, per_prompt_table

N_PROMPTS = 40
PROMPT_SD = 1.0
NOISE_SD = 0.3


def planted(effects: dict[str, float], seed: int = 0, n_prompts: int = N_PROMPTS) -> pd.DataFrame:
    """Per-prompt values: a random intercept per prompt, shared by every policy, plus the policy's effect and noise."""
    rng = np.random.default_rng(seed)
    intercepts = rng.normal(0.0, PROMPT_SD, n_prompts)
    return pd.DataFrame([{"policy": policy, "prompt": f"prompt {i}", "reward": intercepts[i] + effect + rng.normal(0.0, NOISE_SD)}
                         for policy, effect in effects.items() for i in range(n_prompts)])


def test_the_model_recovers_a_planted_effect_with_the_standard_error_of_a_paired_difference() -> None:
    result = mixed_models(planted({"A": 0.0, "B": 0.5}), ["reward"], "A", ["A", "B"])
    assert list(result.columns) == MODEL_COLUMNS
    (row,) = result.itertuples()
    assert (row.metric, row.policy, row.baseline, row.n_prompts, row.converged) == ("reward", "B", "A", N_PROMPTS, True)
    assert abs(row.effect - 0.5) < 2 * row.std_error
    assert row.std_error == pytest.approx(NOISE_SD * math.sqrt(2 / N_PROMPTS), rel=0.3)
    assert row.p_value < 1e-6


def test_with_no_planted_effect_the_p_value_is_not_small() -> None:
    (row,) = mixed_models(planted({"A": 0.0, "B": 0.0}, seed=1), ["reward"], "A", ["A", "B"]).itertuples()
    assert row.converged and row.p_value > 0.01


def test_on_balanced_data_effect_and_error_are_the_paired_t_tests() -> None:
    """An independent route: the mean and standard error of the per-prompt differences B - A."""
    data = planted({"A": 0.0, "B": 0.3}, seed=2)
    wide = data.pivot(index="prompt", columns="policy", values="reward")
    differences = wide["B"] - wide["A"]
    (row,) = mixed_models(data, ["reward"], "A", ["A", "B"]).itertuples()
    assert row.effect == pytest.approx(differences.mean(), abs=1e-9)
    assert row.std_error == pytest.approx(stats.sem(differences), rel=0.02)
    z = differences.mean() / stats.sem(differences)
    assert row.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=0.2)  # statsmodels' Wald test is a z-test


def test_one_row_per_non_baseline_policy_in_the_given_order() -> None:
    data = planted({"C": -0.4, "A": 0.0, "B": 0.5})
    result = mixed_models(data, ["reward"], "A", ["A", "B", "C"])
    assert list(result["policy"]) == ["B", "C"] and set(result["baseline"]) == {"A"}
    assert result["effect"].tolist() == pytest.approx([0.5, -0.4], abs=0.15)


def test_nan_rows_are_dropped_and_a_baseline_without_values_falls_back_to_the_next_policy() -> None:
    data = planted({"reference": 0.0, "A": 0.0, "B": 0.5})
    data["fid"] = data["reward"].where(data["policy"] != "reference")  # the reference against itself: NaN
    data.loc[data.index[data["policy"] == "A"][:5], "reward"] = math.nan  # five prompts lost for A
    result = mixed_models(data, ["reward", "fid"], "reference", ["reference", "A", "B"]).set_index(["metric", "policy"])
    assert result.loc[("reward", "A"), "baseline"] == "reference" and result.loc[("reward", "A"), "converged"]
    assert result.loc[("fid", "B"), "baseline"] == "A (reference has no values)"
    assert ("fid", "A") not in result.index and ("fid", "reference") not in result.index
    assert result.loc[("fid", "B"), "effect"] == pytest.approx(0.5, abs=0.15)


@pytest.mark.parametrize(("message", "converged"), [
    ("Gradient optimization failed, |grad| = 0.5", False),
    ("The Hessian matrix at the estimated parameter values is not positive definite.", False),
    ("The MLE may be on the boundary of the parameter space.", True),  # no prompt variance: a valid answer
])
def test_a_convergence_warning_keeps_the_numbers_and_says_whether_to_trust_them(
        monkeypatch: pytest.MonkeyPatch, message: str, converged: bool) -> None:
    fit = MixedLM.fit

    def warning_fit(self: MixedLM, *args: object, **kwargs: object) -> object:
        warnings.warn(message, ConvergenceWarning)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(MixedLM, "fit", warning_fit)
    (row,) = mixed_models(planted({"A": 0.0, "B": 0.5}), ["reward"], "A", ["A", "B"]).itertuples()
    assert row.converged is converged and abs(row.effect - 0.5) < 2 * row.std_error


def test_fewer_than_two_prompts_gives_the_difference_of_means_and_no_error() -> None:
    data = planted({"A": 0.0, "B": 0.5}, n_prompts=1)
    (row,) = mixed_models(data, ["reward"], "A", ["A", "B"]).itertuples()
    expected = data.loc[1, "reward"] - data.loc[0, "reward"]
    assert row.effect == pytest.approx(expected) and row.n_prompts == 1 and not row.converged
    assert math.isnan(row.std_error) and math.isnan(row.p_value)


@pytest.mark.parametrize(("values", "effect"), [("constant", 0.0), ("prompt only", 0.0), ("shifted", 0.5)])
def test_a_metric_with_no_noise_within_prompts_does_not_raise(values: str, effect: float) -> None:
    """A constant, a value of the prompt alone, B exactly A + 0.5: nothing is left to estimate the noise from."""
    data = planted({"A": 0.0, "B": 0.0})
    by_prompt = data["prompt"].str.len().astype(float)
    data["reward"] = {"constant": 1.0, "prompt only": by_prompt, "shifted": by_prompt + 0.5 * (data["policy"] == "B")}[values]
    result = mixed_models(data, ["reward"], "A", ["A", "B"])
    assert result["effect"].tolist() == pytest.approx([effect]) and not result["converged"].any()
    assert result[["std_error", "p_value"]].isna().all().all()


def test_a_metric_nan_everywhere_or_for_all_but_one_policy_gives_no_rows() -> None:
    data = planted({"A": 0.0, "B": 0.5})
    data["empty"] = math.nan
    data["only_a"] = data["reward"].where(data["policy"] == "A")
    assert mixed_models(data, ["empty", "only_a"], "A", ["A", "B"]).empty


def test_per_prompt_table_is_the_mean_over_seeds_by_hand() -> None:
    per_image = pd.DataFrame({
        "policy": ["A", "A", "A", "B", "B", "B"],
        "prompt": ["cat", "cat", "dog", "cat", "cat", "dog"],
        "seed": [0, 1, 0, 0, 1, 0],
        "reward": [1.0, 3.0, 5.0, 2.0, math.nan, 7.0],
        "lpips": [0.1, 0.3, 0.5, 0.2, 0.4, 0.6],
    })
    table = per_prompt_table(per_image, ["reward", "lpips"]).set_index(["policy", "prompt"])
    assert table.loc[("A", "cat")].tolist() == pytest.approx([2, 2.0, 0.2])
    assert table.loc[("A", "dog")].tolist() == pytest.approx([1, 5.0, 0.5])
    assert table.loc[("B", "cat")].tolist() == pytest.approx([2, 2.0, 0.3])  # the NaN reward left out
    assert table.loc[("B", "dog")].tolist() == pytest.approx([1, 7.0, 0.6])
    assert list(table.columns) == ["n_images", "reward", "lpips"]


def test_policy_names_with_quotes_and_brackets_are_safe() -> None:
    """No name is pasted into the formula, so a run label like `pcpo [lr=1e-4] it's` cannot break it."""
    data = planted({'base "x"': 0.0, "pcpo [lr=1e-4] it's": 0.5})
    (row,) = mixed_models(data, ["reward"], 'base "x"', ['base "x"', "pcpo [lr=1e-4] it's"]).itertuples()
    assert row.policy == "pcpo [lr=1e-4] it's" and row.converged and abs(row.effect - 0.5) < 2 * row.std_error
