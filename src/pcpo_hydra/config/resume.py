"""`pcpo-train resume=<dir>`: the run's own saved config, changed only where a resume may change it.

Hydra composes a resume's command line from today's defaults, which are not the run's: a GRPO run
of 10 epochs would come back as the default PCPO run of 100. The run's .hydra/ holds what it
trained with (config.yaml) and the overrides it was launched with (overrides.yaml). The overrides
given now are applied as a change: a key takes its new value when composing the original
overrides followed by the new ones gives it another value than the original overrides alone;
every other key keeps its saved value, so a conf/ edited since the run changes nothing either.
A key conf/ gained after the run was saved is added at its default, which by this project's rule
is the behaviour from before the key existed (`added_since`).

A change to what was trained is refused, naming the override. Only MAY_CHANGE may change: how
long the run goes on, how often it checkpoints and logs, where it logs, and how (not what) it
computes. The seed is refused too: the checkpoint restores the prompt and shuffling streams, but
every epoch's rollout noise is seeded from it, and the run's MLflow params would go on naming the
old one.

A resume runs in the working directory the run was started in: its relative paths (the default
MLflow store, the text cache, a prompt file, local weights) resolve there, and from anywhere else
they would silently name other files (a new empty store, a new cache). Resolving them against the
original directory instead would also re-anchor relative paths typed on the resume's own command
line, so the resume is refused with the `cd` that fixes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pcpo_hydra.config.validation import ConfigError, resume_problems

log = logging.getLogger(__name__)

MAY_CHANGE = (
    "resume", "epochs", "checkpoint_every", "keep_checkpoints", "log_images_every", "text_cache_dir", "logger",
    "hardware.num_threads", "hardware.collective_timeout_min", "hardware.slurm",
    "model.offload_text_encoders", "model.gradient_checkpointing",
)


def may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in MAY_CHANGE)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as {"dotted.key": value}; lists are single values."""
    if not isinstance(node, dict):
        return {prefix: node}
    found: dict[str, Any] = {}
    for key, value in node.items():
        found.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _compose(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose

    return OmegaConf.to_container(compose(config_name="train", overrides=overrides), resolve=True)


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """{key: new value} for every key whose value differs from `before` to `after` (None: removed)."""
    return {key: after.get(key) for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def added_since(trained: dict[str, Any], composed: dict[str, Any]) -> dict[str, Any]:
    """{key: value} of the keys conf/ has gained since the run was saved, as conf/ sets them now.

    A key added to conf/ defaults to the behaviour from before it existed (train.cfg: true,
    rollout.drop_flat_groups: false), so a run saved without it resumes as it trained. Taken
    whole: a key whose parent the run saved as a value (not a node) is left alone.
    """
    return {key: value for key, value in composed.items()
            if key not in trained and not any(key.startswith(f"{old}.") for old in trained)}


def _owner(key: str, overrides: list[str]) -> str:
    """The override on the command line that set `key` (a group choice sets all its keys), else the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in reversed(OverridesParser.create().parse_overrides(overrides)):
        name = override.key_or_group
        if key == name or key.startswith(f"{name}."):
            return override.input_line
    return key


def refusals(changed: dict[str, Any], trained: dict[str, Any], overrides: list[str]) -> list[str]:
    """One problem per override that changes a key outside MAY_CHANGE from its trained value.

    Keys no override names (a model's recipe sets the learning rate) are reported through the
    override that does change something, when there is one.
    """
    refused: dict[str, str] = {}
    for key in sorted(changed):
        if not may_change(key) and changed[key] != trained.get(key):
            refused.setdefault(_owner(key, overrides), f"{key}: {trained.get(key)!r} -> {changed[key]!r}")
    named = {override: change for override, change in refused.items() if "=" in override}
    allowed = ", ".join(MAY_CHANGE[1:])  # `resume` itself goes without saying
    return [f"{override}: a resume cannot change what the run trained ({change}); start a new run for it "
            f"(a resume may change only {allowed})" for override, change in (named or refused).items()]


def saved_run(resume: str, hydra_cfg: DictConfig) -> Path:
    """The .hydra/ folder of the run to resume, after checking it can be resumed from here; else ConfigError."""
    problems = resume_problems(resume)
    if problems:
        raise ConfigError(problems)
    run_dir = Path(resume).resolve()
    saved = run_dir / ".hydra"
    if not (saved / "config.yaml").is_file():
        raise ConfigError([f"resume={resume!r}: no .hydra/config.yaml in it, so its config is unknown; "
                           "give the directory pcpo-train created for the run"])
    started_in = Path(OmegaConf.load(saved / "hydra.yaml").hydra.runtime.cwd)
    if started_in != Path(hydra_cfg.runtime.cwd):
        raise ConfigError([f"resume={resume!r}: the run was started in {started_in}, where its relative paths "
                           f"(MLflow store, text cache, prompt files) resolve; resume it from there: cd {started_in}"])
    if Path(hydra_cfg.runtime.output_dir).resolve() != run_dir:
        raise ConfigError([f"hydra.run.dir={hydra_cfg.runtime.output_dir}: a resumed run writes into the "
                           f"directory it continues ({run_dir}); drop hydra.run.dir"])
    return saved


def resumed_config(cfg: DictConfig) -> DictConfig:
    """The config of the run `cfg.resume` names, with this launch's allowed overrides applied; else ConfigError.

    It replaces the defaults-composed config Hydra saved for this launch (.hydra/resumed_<time>/).
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    saved = saved_run(cfg.resume, hydra_cfg)
    overrides = list(hydra_cfg.overrides.task)
    trained = OmegaConf.to_container(OmegaConf.load(saved / "config.yaml"), resolve=True)
    original = list(OmegaConf.load(saved / "overrides.yaml"))
    before, after = leaves(_compose(original)), leaves(_compose(original + overrides))
    changed = changes(before, after)
    problems = refusals(changed, leaves(trained), overrides)
    if problems:
        raise ConfigError(problems)
    added = added_since(leaves(trained), before)
    if added:
        log.info("resume: keys added to conf/ since the run was saved, at their defaults: %s",
                 ", ".join(f"{key}={value!r}" for key, value in sorted(added.items())))
    result = OmegaConf.create(trained)
    for key, value in {**added, **changed}.items():
        OmegaConf.update(result, key, value, force_add=True)
    if hydra_cfg.output_subdir is not None:
        OmegaConf.save(result, Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir / "config.yaml")
    return result
