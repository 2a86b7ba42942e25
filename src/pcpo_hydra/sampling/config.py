"""pcpo-sample's config: its schema, where each policy's weights are, and the run config it samples with.

Torch-free: everything here runs before the model is built, so a bad key fails in a second.

A policy source is a run directory (its `final_weights`, else its newest intact checkpoint's
`weights`; with `match.reward`, the checkpoint matched to that evaluation reward), a weights folder
itself (what `save_trainable` writes: a LoRA adapter or a full network), or `runs:/<MLflow run id>`
(`sampling.sources`, which imports mlflow only for such a source). A run directory, and a weights
folder inside one (its final_weights, a checkpoint's weights), also knows what it was trained from: the first such source among `policy` and
`irg.policies` supplies the `model` and `sampler` nodes of its saved .hydra/config.yaml (its tiny
model's weight seed included), except where the command line chooses or sets them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pcpo_hydra.checkpoint import WEIGHTS, intact_checkpoint
from pcpo_hydra.config.checks import checked, one_of, positive
from pcpo_hydra.config.validation import ConfigError, family_problems, check_tree
from pcpo_hydra.evaluation.matching import PICKS
from pcpo_hydra.paths import unwritable
from pcpo_hydra.preflight import device_problems, need_problems

MANIFEST = "manifest.json"  # what each PNG of a sample folder is (sampling.run writes it, pcpo-eval reads it)
FINAL_WEIGHTS = "final_weights"  # what build.run writes into a finished run's directory
WEIGHT_FILES = ("adapter_model.safetensors", "diffusion_pytorch_model.safetensors")  # LoRA, full
GROUPS = ("model", "sampler", "prompts", "hardware", "logger")
RUNS_PREFIX = "runs:/"  # a policy source naming an MLflow run: runs:/<run id>


@dataclass
class IrgSchema:
    policies: Optional[dict[str, str]] = MISSING  # name -> run dir or weights folder (null: none)
    weights: Optional[dict[str, float]] = MISSING  # name -> w_k (null: none)


@dataclass
class MatchSchema:
    reward: Optional[float] = MISSING  # sample each run dir's checkpoint at this eval reward (null: its final weights)
    pick: str = checked(one_of(*PICKS))  # nearest | below | above the target


@dataclass
class SampleSchema:
    """conf/sample.yaml; its groups are checked by the schemas their components registered."""

    seed: int = MISSING
    policy: Optional[str] = MISSING
    irg: IrgSchema = MISSING
    match: MatchSchema = MISSING
    seeds: list[int] = MISSING
    max_prompts: Optional[int] = checked(positive())
    batch_size: int = checked(positive())
    deterministic: bool = MISSING
    out: str = MISSING
    log_to_mlflow: bool = MISSING
    run_name: Optional[str] = MISSING
    model: Any = MISSING
    sampler: Any = MISSING
    prompts: Any = MISSING
    hardware: Any = MISSING
    logger: Any = MISSING


def weights_folder(source: str, key: str, match: Any = None) -> tuple[Path | None, str | None]:
    """(the weights folder of a policy source, None) or (None, the problem with `key`=source).

    With `match.reward` set, a run dir gives its checkpoint matched to that reward; (None, None)
    when that is epoch 0, the base model (a policy at its base contributes nothing to the mixture).
    """
    path = Path(source)
    if match is not None and match.reward is not None:
        from pcpo_hydra.sampling.sources import matched_checkpoint

        try:
            found = matched_checkpoint(source, key, match)
        except ConfigError as error:
            return None, error.problems[0]
        if found is not None:
            return found.weights, None
    if any((path / name).is_file() for name in WEIGHT_FILES):
        return path, None
    if (path / FINAL_WEIGHTS).is_dir():
        return path / FINAL_WEIGHTS, None
    checkpoint, damaged = intact_checkpoint(path)
    if checkpoint is not None:
        return checkpoint / WEIGHTS, None
    if not path.exists():
        return None, f"{key}={source!r}: no such file or directory; give a run dir or a weights folder"
    why = f" (damaged: {'; '.join(damaged)})" if damaged else ""
    return None, (f"{key}={source!r}: neither a run dir with final_weights or an intact checkpoint{why}, "
                  f"nor a weights folder ({' or '.join(WEIGHT_FILES)}); give one of those")


def sources(cfg: DictConfig) -> dict[str, str]:
    """{config key: policy source} for `policy` and each of `irg.policies`."""
    found = {} if cfg.policy is None else {"policy": cfg.policy}
    found.update({f"irg.policies.{name}": source for name, source in (cfg.irg.policies or {}).items()})
    return found


def irg_weights(cfg: DictConfig) -> dict[str, float]:
    """{name: w_k} of `irg.weights` ({} when null)."""
    return {name: float(w) for name, w in (cfg.irg.weights or {}).items()}


def _saved_config(source: str) -> DictConfig | None:
    """The saved config of the run a source belongs to: the run dir itself, or one above its weights.

    A run's final_weights is one level below it, a checkpoint's weights three
    (<run>/checkpoints/epoch_N/weights).
    """
    path = Path(source).resolve()
    for folder in [path, *path.parents[:3]]:
        saved = folder / ".hydra" / "config.yaml"
        if saved.is_file():
            return OmegaConf.load(saved)
    return None


def _overridden(overrides: list[str]) -> tuple[bool, list[str]]:
    """(whether the command line chose a model or sampler option, the dotted model./sampler. keys it set)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    chosen, keys = False, []
    for override in OverridesParser.create().parse_overrides(overrides):
        name = override.key_or_group
        if name in ("model", "sampler"):
            chosen = True
        elif name.split(".")[0] in ("model", "sampler"):
            keys.append(name)
    return chosen, keys


def with_run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`cfg` sampling with the model and sampler of the first run dir among its policies, overrides kept.

    A chosen model or sampler option on the command line keeps both composed nodes (a model
    option brings its own sampler); a dotted key (`sampler.num_steps=20`) is set on the run's node.
    """
    run = next((saved for saved in map(_saved_config, sources(cfg).values()) if saved is not None), None)
    chosen, keys = _overridden(overrides)
    if run is None or chosen:
        return cfg
    result = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    saved = OmegaConf.to_container(run, resolve=True)  # the run's own seed fills its model's ${seed}
    for group in ("model", "sampler"):
        result[group] = saved[group]
    for key in keys:
        OmegaConf.update(result, key, OmegaConf.select(cfg, key), force_add=True)
    return result


def _policy_problems(cfg: DictConfig) -> list[str]:
    problems = [problem for key, source in sources(cfg).items()
                for problem in [weights_folder(source, key, cfg.match)[1]] if problem is not None]
    policies, weights = set(cfg.irg.policies or {}), set(irg_weights(cfg))
    for name in sorted(policies - weights):
        problems.append(f"irg.policies.{name}: has no weight; set irg.weights.{name}=<w>")
    for name in sorted(weights - policies):
        problems.append(f"irg.weights.{name}: names no policy; set irg.policies.{name}=<run dir or weights folder>")
    if "policy" in policies:
        problems.append("irg.policies.policy: the name `policy` is the top-level policy's; rename it")
    for key, source in sources(cfg).items():
        saved = _saved_config(source)
        if saved is not None and saved.model.get("_target_") != cfg.model._target_:
            problems.append(f"{key}={source!r}: trained model._target_={saved.model._target_!r}, but this "
                            f"samples {cfg.model._target_!r}; every policy must come from the same base model")
    if not cfg.seeds:
        problems.append("seeds=[]: give at least one seed, e.g. seeds=[0,1,2]")
    return problems


def check_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The sample config typed by its schemas, policies found and the run's model adopted; else ConfigError.

    Keys a model's recipe adds for training (epochs, rollout, ...) are dropped before typing: a
    key typed on the command line that the config lacks Hydra itself refuses. `runs:/<id>` sources
    become the run dirs they name (`sampling.sources`) before the run's model is adopted.
    """
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"{exc.full_key}: {exc.msg}"]) from None
    cfg = OmegaConf.create({f.name: resolved[f.name] for f in fields(SampleSchema) if f.name in resolved})
    typed = _with_local_sources(check_tree(cfg, SampleSchema, GROUPS))
    typed = check_tree(with_run_config(typed, overrides), SampleSchema, GROUPS)
    problems = family_problems(typed) + _policy_problems(typed) + machine_problems(typed)
    if problems:
        raise ConfigError(problems)
    OmegaConf.set_readonly(typed, True)
    return typed


def _with_local_sources(cfg: DictConfig) -> DictConfig:
    """`cfg` with each `runs:/<id>` policy source replaced by the run dir it names on this machine."""
    if not any(source.startswith(RUNS_PREFIX) for source in sources(cfg).values()):
        return cfg
    from pcpo_hydra.sampling.sources import local_run_dir

    result = OmegaConf.create(OmegaConf.to_container(cfg))
    for key, source in sources(cfg).items():
        OmegaConf.update(result, key, local_run_dir(source, key, cfg.logger, Path(cfg.out)))
    return check_tree(result, SampleSchema, GROUPS)


def machine_problems(cfg: DictConfig) -> list[str]:
    """What this machine lacks for the config, as pcpo-train's preflight asks: the groups' NEEDS, the device, `out`."""
    problems = need_problems(cfg, ("model", "sampler", "prompts"))
    problems += device_problems(cfg.hardware)
    unwritable_out = unwritable(Path(cfg.out))
    if unwritable_out:
        problems.append(f"out={cfg.out!r}: cannot write there ({unwritable_out}); set out=<writable folder>")
    return problems
