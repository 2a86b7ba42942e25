"""Per-prompt means and the linear mixed models that compare policies, as the PCPO paper's Tables 2-4 do.

Every policy samples the same prompts and seeds, so a prompt's difficulty is shared by all of them:
a model with the prompt as a random intercept removes it, and the policy's fixed effect against a
baseline is measured against the noise within prompts alone. pandas and statsmodels are imported
inside the functions, so importing this module (as pcpo-eval's --help does) costs nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import pandas as pd

MODEL_COLUMNS = ["metric", "policy", "baseline", "effect", "std_error", "p_value", "n_prompts", "converged"]
# ConvergenceWarnings that do not make a fit unreliable: a prompt variance of zero is a valid REML
# answer (the model is then ordinary least squares), and a retry means a later optimizer converged.
_HARMLESS = ("boundary of the parameter space", "Retrying MixedLM optimization")


class Effect(NamedTuple):
    """One policy's fixed effect against the baseline."""

    effect: float
    std_error: float
    p_value: float
    converged: bool


def per_prompt_table(per_image: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (policy, prompt): `n_images` and the mean of each metric over the prompt's seeds.

    The mixed models take these means, not the images: seeds are the same across policies, so a
    prompt's images are replicates, and averaging them keeps the model's random part to prompts.
    NaN values are left out of a mean (a metric that is NaN for every image stays NaN).
    """
    grouped = per_image.groupby(["policy", "prompt"], sort=False)
    table = grouped[metrics].mean()
    table.insert(0, "n_images", grouped.size())
    return table.reset_index()


def mixed_models(per_prompt: pd.DataFrame, metrics: list[str], baseline: str,
                 policies_order: list[str]) -> pd.DataFrame:
    """For each metric, `value ~ C(policy, Treatment(baseline))` with prompt as random intercept (REML).

    One row per metric and non-baseline policy (columns MODEL_COLUMNS), in `policies_order` (policies
    it does not name come after, sorted).
    Rows whose metric is NaN are dropped first; a policy left with none gets no row for that metric.
    If the baseline has none (fidelity of the reference to itself), the first policy of
    `policies_order` that has rows is the baseline instead, and the `baseline` column says
    "<policy> (<baseline> has no values)". `n_prompts` counts the prompts in that metric's fit.

    The p-value is statsmodels' Wald z-test. Degenerate data never raises. With fewer than 2 prompts
    there is no within-prompt noise to measure; a fit that fails (a singular matrix), finds no noise
    within prompts (a constant metric, policies that agree exactly) or gives standard errors that are
    not finite measures nothing either: the effect is then the difference of the per-prompt
    means, std_error and p_value are NaN, and converged is False. A fit that warns of non-convergence
    or a singular matrix keeps its numbers with converged False.
    """
    import pandas as pd

    rows = []
    for metric in metrics:
        data = per_prompt.loc[per_prompt[metric].notna(), ["policy", "prompt", metric]]
        data = data.rename(columns={metric: "value"})
        found = set(data["policy"])
        present = [p for p in policies_order if p in found] + sorted(found - set(policies_order))
        if not present:
            continue
        chosen = baseline if baseline in present else present[0]
        label = chosen if chosen == baseline else f"{chosen} ({baseline} has no values)"
        others = [p for p in present if p != chosen]
        data["policy"] = pd.Categorical(data["policy"], categories=[chosen, *others])
        n_prompts = data["prompt"].nunique()
        effects = _fit(data) if n_prompts >= 2 and others else {}
        for policy in others:
            effect = effects.get(policy) or _mean_difference(data, policy, chosen)
            rows.append({"metric": metric, "policy": policy, "baseline": label, **effect._asdict(),
                         "n_prompts": n_prompts})
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def _fit(data: pd.DataFrame) -> dict[str, Effect]:
    """The LMM's effect of each non-baseline level of data's categorical `policy`; {} when the fit fails."""
    import numpy as np
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, SingularMatrixWarning

    # The categorical's first level is the treatment reference: the same contrasts as
    # Treatment(baseline), with no policy name pasted into the formula (where a quote would break it).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # numpy's divide-by-zero on degenerate data is not news here
        try:
            result = smf.mixedlm("value ~ C(policy)", data, groups=data["prompt"]).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError):
            return {}
    # No noise within prompts: the optimizer stops near, not at, a residual variance of 0 (relative
    # 1e-10 seen), and the standard errors it then reports are its rounding, not a measurement.
    if not result.scale > 1e-8 * data["value"].var():
        return {}
    troubled = any(issubclass(w.category, (ConvergenceWarning, SingularMatrixWarning))
                   and not any(harmless in str(w.message) for harmless in _HARMLESS) for w in caught)
    effects = {}
    for policy in data["policy"].cat.categories[1:]:
        name = f"C(policy)[T.{policy}]"
        error = float(result.bse_fe[name])
        if not (math.isfinite(error) and error > 0):
            return {}
        effects[policy] = Effect(float(result.fe_params[name]), error, float(result.pvalues[name]),
                                 bool(result.converged) and not troubled)
    return effects


def _mean_difference(data: pd.DataFrame, policy: str, baseline: str) -> Effect:
    """The fallback when no model can be fitted: the difference of the two policies' per-prompt means."""
    means = data.groupby("policy", observed=True)["value"].mean()
    return Effect(float(means[policy] - means[baseline]), math.nan, math.nan, False)
