"""`validate(cfg)`: type-check every node against its schema and check every bound, all at once.

All problems are collected and reported together, each naming the key, the bad value and what is
allowed, so one failed launch tells the user everything to fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import Field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pcpo_hydra.checkpoint import intact_checkpoint
from pcpo_hydra.config.checks import violations
from pcpo_hydra.config.registry import group_schemas, nested_nodes, schema_for
from pcpo_hydra.config.run_schema import RunSchema
from pcpo_hydra.algorithms.steps import stored_steps, trained_steps


class ConfigError(ValueError):
    """Raised before any heavy work when the composed config is invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:  # one line: the key, the value and the fix
            super().__init__(f"invalid configuration: {problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


def _typed(schema: type, node: DictConfig, prefix: str, problems: list[str]) -> DictConfig | None:
    """Merge `node` onto its schema (types, unknown keys, missing values) and check field bounds."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:  # every key left out at once, each with what it takes
            problems.extend(f"{_joined(prefix, key)}: is missing; set it to {_wanted(schema, key)}" for key in missing)
            return None
        problems.extend(violations(OmegaConf.to_object(merged), prefix))
        return merged
    except OmegaConfBaseException as exc:
        key = _joined(prefix, exc.full_key) if exc.full_key else prefix
        message = str(exc.msg).splitlines()[0]
        if isinstance(exc, ConfigKeyError):
            message += _allowed_keys(schema, str(exc.full_key), key)
        problems.append(f"{key}: {message}")
        return None


def _joined(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_at(schema: type, dotted: str) -> tuple[Field | None, Any]:
    """The dataclass field at `dotted` below `schema` and its declared type (None, Any where no schema types it)."""
    found: Field | None = None
    hint: Any = schema
    for name in dotted.split("."):
        kind = _unwrap_optional(hint)
        found = {f.name: f for f in fields(kind)}.get(name) if is_dataclass(kind) else None
        if found is None:
            return None, Any
        hint = get_type_hints(kind)[name]
    return found, hint


def _unwrap_optional(hint: Any) -> Any:
    if get_origin(hint) is Union:
        return next(arg for arg in get_args(hint) if arg is not type(None))
    return hint


_TYPE_WORDS = {bool: "true or false", str: "a string", int: "an integer", float: "a number",
               list: "a list", dict: "a mapping"}


def _wanted(schema: type, dotted: str) -> str:
    """What a missing key takes, in an error message's words: its constraint, else its type (and null if allowed)."""
    found, hint = _field_at(schema, dotted)
    kind = _unwrap_optional(hint)
    constraint = found.metadata.get("constraint") if found is not None else None
    if constraint is not None:
        allowed = constraint.allowed
    elif is_dataclass(kind):
        allowed = f"a node with keys {', '.join(f.name for f in fields(kind))}"
    elif kind is Any:
        allowed = "a config node"
    else:
        allowed = _TYPE_WORDS.get(get_origin(kind) or kind, f"a {getattr(kind, '__name__', kind)}")
    return allowed + (" or null" if type(None) in get_args(hint) else "")


def _allowed_keys(schema: type, full_key: str, key: str) -> str:
    """'; did you mean <key>? (allowed keys: ...)' for a key the node at `full_key` of `schema` lacks."""
    parent, _, name = full_key.rpartition(".")
    node = _unwrap_optional(_field_at(schema, parent)[1]) if parent else schema
    allowed = [f.name for f in fields(node) if f.name != "_target_"] if is_dataclass(node) else []
    close = difflib.get_close_matches(name, allowed, n=1)
    prefix = key.rpartition(".")[0]
    meant = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"{meant} (allowed keys: {', '.join(allowed)})"


def _check_node(group: str, node: DictConfig, key: str, problems: list[str]) -> DictConfig | None:
    """Type `node` (found at `key`) by the schema of `group` its `_target_` picks, nested nodes included."""
    try:
        schema = schema_for(group, node, key)
    except KeyError as exc:
        problems.append(str(exc.args[0]))
        return None
    maps = {name: spec for name, spec in getattr(schema, "NESTED", {}).items() if spec.many}
    # Hydra drops a node whose last option was removed (~reward@reward.components.x): that is an empty one
    absent = {field_name: {} for field_name in maps if field_name not in node}
    typed = _typed(schema, OmegaConf.merge(node, absent) if absent else node, key, problems)
    for field_name, spec in maps.items():
        if typed is not None and not node.get(field_name) and not spec.may_be_empty:
            problems.append(f"{key}.{field_name}: is empty; give at least one {spec.group} node")
    _check_nested(schema, node, key, typed, problems)
    return typed


def _check_nested(schema: type, node: DictConfig, key: str, typed: DictConfig | None, problems: list[str]) -> None:
    """Type each node nested in `node` (schema.NESTED) by its own group's schema, into `typed`."""
    for field_name, spec, child_key, name, child in nested_nodes(schema, node, key):
        child_typed = _check_node(spec.group, child, child_key, problems)
        if typed is not None and child_typed is not None:
            if name is None:
                typed[field_name] = child_typed
            else:
                typed[field_name][name] = child_typed


# The sampler options of each model family, for the error that pairs them.
_SAMPLERS_OF = {"diffusion": "sampler=ddim", "flow": "sampler=dancegrpo_sde or sampler=flowgrpo_sde"}


def family_problems(cfg: DictConfig) -> list[str]:
    """A sampler steps one kind of network output (epsilon or velocity): the model must predict it."""
    model, sampler = schema_for("model", cfg.model).FAMILY, schema_for("sampler", cfg.sampler).FAMILY
    if model == sampler:
        return []
    return [
        f"sampler._target_={cfg.sampler._target_!r}: a {sampler} sampler cannot step "
        f"model._target_={cfg.model._target_!r}, a {model} model; use {_SAMPLERS_OF[model]} with it, "
        f"or a {sampler} model"
    ]


def _cross_checks(cfg: DictConfig) -> list[str]:
    """Relations between keys that no single field can check."""
    problems = family_problems(cfg)
    rollout, train = cfg.rollout, cfg.train
    total = rollout.prompts_per_epoch * rollout.group_size
    where = f"rollout.prompts_per_epoch x rollout.group_size = {total} images per epoch"
    if total % rollout.batch_size:
        problems.append(f"rollout.batch_size={rollout.batch_size}: must divide {where}")
    if total % train.batch_size:
        problems.append(f"train.batch_size={train.batch_size}: must divide {where}")
    elif (total // train.batch_size) % train.num_updates:
        problems.append(
            f"train.num_updates={train.num_updates}: must divide the {total // train.batch_size} "
            f"training micro-batches per inner epoch ({where} / train.batch_size)"
        )
    advantage = cfg.algorithm.advantage if "advantage" in cfg.algorithm else None  # a plugin's may have none
    if rollout.drop_flat_groups and advantage != "group":
        problems.append(
            f"rollout.drop_flat_groups=true: needs algorithm.advantage='group' (got {advantage!r}), the only "
            "advantages that are zero for a group of equal rewards; set rollout.drop_flat_groups=false"
        )
    stored = stored_steps(cfg.sampler)
    if trained_steps(stored, train.timestep_fraction) < 1:
        where = "sampler.sde_window.size" if stored != cfg.sampler.num_steps else "sampler.num_steps"
        problems.append(
            f"train.timestep_fraction={train.timestep_fraction}: trains no step of {where}={stored}; raise one of them"
        )
    deepspeed = cfg.hardware.deepspeed
    if train.ema.decay is not None and deepspeed is not None and deepspeed.stage == 3:
        problems.append(
            f"train.ema.decay={train.ema.decay}: needs every trained weight whole on each rank, which "
            "hardware.deepspeed.stage=3 shards; use ZeRO stage 2 (hardware=node8_zero2) or train.ema.decay=null"
        )
    run_problems = getattr(schema_for("algorithm", cfg.algorithm), "run_problems", None)  # what it needs of the run
    if run_problems is not None:
        problems.extend(run_problems(cfg))
    problems.extend(resume_problems(cfg.resume))
    return problems


def resume_problems(resume: str | None) -> list[str]:
    """A run dir to resume must hold a checkpoint that loads: its newest intact one is used."""
    if resume is None:
        return []
    checkpoint, damaged = intact_checkpoint(Path(resume))
    if checkpoint is not None:
        return []
    if damaged:
        return [f"resume={resume!r}: no intact checkpoint ({'; '.join(damaged)}); "
                "restore the file or start a new run"]
    return [f"resume={resume!r}: no complete checkpoint in its checkpoints/ folder "
            "(give the run directory of a run that saved one; see checkpoint_every)"]


def check_tree(cfg: DictConfig, schema: type, groups: Iterable[str]) -> DictConfig:
    """`cfg` resolved, typed by `schema` and each of `groups` by its own schema; else ConfigError with all problems.

    Shared by pcpo-train and pcpo-reward-server, so a reward node is checked the same way by both.
    """
    problems: list[str] = []
    try:  # resolve once at the root, so group nodes can be checked on their own
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as exc:
        raise ConfigError([f"{exc.full_key}: {exc.msg}"]) from None
    typed = _typed(schema, cfg, "", problems)
    _check_nested(schema, cfg, "", typed, problems)  # a command's own nested nodes (pcpo-eval's rewards)
    nodes = {group: _check_node(group, cfg[group], group, problems) for group in groups}
    if problems or typed is None or any(node is None for node in nodes.values()):
        raise ConfigError(problems)
    for group, node in nodes.items():
        typed[group] = node
    return typed


def validate(cfg: DictConfig) -> DictConfig:
    """Return the run config with every node typed by its schema, or raise ConfigError listing all problems."""
    typed = check_tree(cfg, RunSchema, group_schemas())
    problems = _cross_checks(typed)
    if problems:
        raise ConfigError(problems)
    OmegaConf.set_readonly(typed, True)
    return typed
