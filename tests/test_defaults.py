"""One source for every default: the YAML under conf/.

Schemas carry no default (every field is `???`), so a key an option leaves out is refused by name
rather than filled in from a second copy; and a Python default a component keeps for its direct
callers (tests, scripts) must be what every conf/ option targeting it says. That every option of
every group composes and validates is test_config.py's test_every_group_option_composes_and_validates:
with required fields it is also the proof that each option sets every key its schema has.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from omegaconf import MISSING, OmegaConf, open_dict

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.config.registry import group_schemas
from pcpo_hydra.config.run_schema import RunSchema
from pcpo_hydra.rewards.server import RewardServerSchema, check_config

from conftest import shapes_world_conf


def _nested(kind: Any) -> list[type]:
    """The dataclasses a field's type names (a schema, or one inside Optional)."""
    kinds = get_args(kind) if get_origin(kind) is Union else (kind,)
    return [k for k in kinds if dataclasses.is_dataclass(k)]


def every_schema() -> list[type]:
    """Every schema class a config can be checked against, nested ones (LoRA, DeepSpeed, SLURM) included."""
    found: list[type] = []
    todo = [RunSchema, RewardServerSchema, *(s for schemas in group_schemas().values() for s in schemas.values())]
    while todo:
        schema = todo.pop()
        if schema not in found:
            found.append(schema)
            todo.extend(k for hint in get_type_hints(schema).values() for k in _nested(hint))
    return sorted(found, key=lambda s: s.__name__)


def _default(f: dataclasses.Field) -> Any:
    """A field's default, or MISSING when it has none (no default at all, or `???`)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING if f.default is dataclasses.MISSING else f.default


@pytest.mark.parametrize("schema", every_schema(), ids=lambda s: s.__name__)
def test_no_schema_field_has_a_default(schema: type) -> None:
    defaulted = {f.name: _default(f) for f in dataclasses.fields(schema) if f.name != "_target_" and _default(f) != MISSING}
    assert defaulted == {}, f"{schema.__name__}: give these keys in conf/ and make the fields `= MISSING`"


def test_a_schemas_target_is_no_default_but_the_key_it_is_found_by() -> None:
    for group, schemas in group_schemas().items():
        for target, schema in schemas.items():
            declared = {f.name: _default(f) for f in dataclasses.fields(schema)}
            if target is None:  # a group without _target_ (hardware)
                assert "_target_" not in declared, schema
            else:  # a schema shared by several targets (JPEG, the world's rewards) leaves it required
                assert declared["_target_"] in (target, MISSING), schema


def run_config(*overrides: str, drop: tuple[str, ...] = ()) -> Any:
    """The composed train config with the dotted keys in `drop` removed, as if an option left them out."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        for key in drop:
            parent, _, name = key.rpartition(".")
            del (OmegaConf.select(cfg, parent) if parent else cfg)[name]
    return cfg


@pytest.mark.parametrize(
    ("overrides", "drop", "expected"),
    [
        ((), ("epochs",), "epochs: is missing; set it to a number > 0"),
        ((), ("model.lora.rank",), "model.lora.rank: is missing; set it to a number > 0"),
        ((), ("model.lora.enabled",), "model.lora.enabled: is missing; set it to true or false"),
        ((), ("optim",), "optim: is missing; set it to a node with keys lr, weight_decay, betas, eps"),
        ((), ("hardware.slurm.qos",), "hardware.slurm.qos: is missing; set it to a string or null"),
        (("model=tiny_sd3",), ("sampler.noise_level",), "sampler.noise_level: is missing; set it to a number > 0"),
        (("reward=multi",), ("reward.components.clip.scale",),
         "reward.components.clip.scale: is missing; set it to a number > 0"),
    ],
)
def test_a_left_out_key_is_named_with_what_it_takes(overrides, drop, expected) -> None:
    with pytest.raises(ConfigError) as info:
        validate(run_config(*overrides, drop=drop))
    assert str(info.value) == f"invalid configuration: {expected}"


def test_every_left_out_key_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        validate(run_config(drop=("keep_checkpoints", "rollout.group_size", "sampler.eta", "algorithm.credit_mode")))
    assert sorted(info.value.problems) == [
        "algorithm.credit_mode: is missing; set it to one of 'variance', 'reweight' or null",
        "keep_checkpoints: is missing; set it to a number > 0",
        "rollout.group_size: is missing; set it to a number >= 2",
        "sampler.eta: is missing; set it to a number in (0.0, 1.0]",
    ]


def test_the_reward_server_names_a_left_out_key_too() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="reward_server")
    with open_dict(cfg):
        del cfg.server["port"]
    with pytest.raises(ConfigError, match=r"^invalid configuration: server.port: is missing; set it to a number in \[0, 65535\]$"):
        check_config(cfg)


# ------------------------------------------------------------------ Python defaults of components


def target_options() -> list[tuple[str, str]]:
    """(group, option) for every option of the groups whose nodes name a `_target_` (all but hardware),
    the shapes-world plugin's included: an outside component's defaults follow the same rule."""
    roots = (Path(config_dir()), shapes_world_conf())
    return [(group, path.stem) for group, schemas in group_schemas().items() if None not in schemas
            for root in roots for path in sorted((root / group).glob("*.yaml"))]


# What an option needs beside itself to validate (test_config.py's ALONE_INVALID).
_WITH = {("sampler", "dancegrpo_sde"): ("model=tiny_flux",), ("sampler", "flowgrpo_sde"): ("model=tiny_sd3",),
         ("prompts", "file"): (f"prompts.path={Path(__file__)}",)}


def _nodes(node: Any, key: str) -> list[tuple[str, Any]]:
    """A group node and, for a multi reward, each component node (components are whole reward nodes)."""
    parts = node.get("components") or {}
    return [(key, node), *((f"{key}.components.{name}", child) for name, child in parts.items())]


def _same(name: str, default: Any, value: Any) -> bool:
    if name == "lora":  # None and {enabled: false} both mean full fine-tuning
        from pcpo_hydra.models.trainable import lora_settings

        return lora_settings(default) == lora_settings(value)
    return default == value


@pytest.mark.parametrize(("group", "option"), target_options(), ids=lambda v: v)
def test_a_components_python_defaults_are_what_its_conf_option_says(group: str, option: str) -> None:
    """Kept only for direct callers (tests, scripts); None means 'not given' (the weights' own size,
    full fine-tuning, no health check), never a copy of a value, so only other defaults are compared."""
    cfg = validate(run_config(f"{group}={option}", *_WITH.get((group, option), ())))
    disagree = {}
    for key, node in _nodes(cfg[group], group):
        module, _, name = node._target_.rpartition(".")
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        plain = OmegaConf.to_container(node, resolve=True)
        for parameter in parameters.values():
            default = parameter.default
            if default is inspect.Parameter.empty or default is None or parameter.name not in plain:
                continue
            if not _same(parameter.name, default, plain[parameter.name]):
                disagree[f"{key}.{parameter.name}"] = (default, plain[parameter.name])
    assert disagree == {}, f"{node._target_}: its signature's defaults differ from conf/{group}/{option}.yaml"
