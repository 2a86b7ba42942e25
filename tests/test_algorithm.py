"""The Algorithm protocol: GRPO and PCPO build as ClippedPolicyGradient, old checkpoints load, misfits fail by name."""

from __future__ import annotations

import inspect

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pcpo_hydra.algorithms import Algorithm, ClippedPolicyGradient, GroupRelative, PerPrompt
from pcpo_hydra.config import validate

PROTOCOL = [name for name in vars(Algorithm) if not name.startswith("_")]


def test_the_clipped_method_has_every_protocol_method_with_its_parameters() -> None:
    assert PROTOCOL == ["prepare", "advantages", "update", "state_dict", "load_state_dict"]
    for name in PROTOCOL:
        expected = list(inspect.signature(getattr(Algorithm, name)).parameters)
        assert list(inspect.signature(getattr(ClippedPolicyGradient, name)).parameters) == expected, name


@pytest.mark.parametrize("preset, estimator", [("grpo", GroupRelative), ("pcpo", PerPrompt)])
def test_the_presets_build_the_clipped_method_through_the_target_saved_configs_name(compose_cfg, preset, estimator):
    overrides = [f"algorithm={preset}"] + (["algorithm.advantage=per_prompt"] if estimator is PerPrompt else [])
    cfg = validate(compose_cfg(*overrides))
    assert cfg.algorithm._target_ == "pcpo_hydra.algorithms.build.build_algorithm"  # what resume= reloads
    algorithm = instantiate(cfg.algorithm, group_size=cfg.rollout.group_size, _convert_="all")
    assert isinstance(algorithm, ClippedPolicyGradient) and isinstance(algorithm, Algorithm)
    assert isinstance(algorithm.estimator, estimator)
    assert (algorithm.policy.objective, algorithm.policy.credit) == (
        ("ratio", "native") if preset == "grpo" else ("log_hinge", "proportional")
    )


def trainer_with(algorithm):
    """A Trainer around `algorithm` alone: enough for its state, nothing built."""
    from accelerate import Accelerator

    from pcpo_hydra.loop import Components, Trainer
    from pcpo_hydra.tracker import NullTracker

    cfg = OmegaConf.create({"seed": 0, "rollout": {"prompts_per_epoch": 2, "group_size": 2, "batch_size": 4}})
    parts = Components(None, None, None, algorithm, None, None)
    return Trainer(cfg, parts, Accelerator(cpu=True), NullTracker(), ".")


def per_prompt() -> ClippedPolicyGradient:
    return ClippedPolicyGradient(None, PerPrompt(buffer_size=4, min_count=1, clip=5.0))


def test_a_checkpoint_from_before_pluggable_algorithms_restores_the_per_prompt_statistics() -> None:
    prompts = ["cat", "cat", "dog", "dog"]
    trained = per_prompt()
    trained.advantages(prompts, torch.tensor([1.0, 2.0, 3.0, 5.0]))
    state = trainer_with(trained).state_dict()
    assert state["algorithm"] == {"buffers": {"cat": [1.0, 2.0], "dog": [3.0, 5.0]}}
    # the same state as the trainer saved it until algorithms became pluggable
    old = {**{key: value for key, value in state.items() if key != "algorithm"}, "advantages": state["algorithm"]}
    following = torch.tensor([3.0, 0.0, 4.0, 4.0])
    expected = trained.advantages(prompts, following)  # the uninterrupted run's next epoch
    for saved in (state, old):
        resumed = per_prompt()
        trainer_with(resumed).load_state_dict(saved)
        assert torch.equal(resumed.advantages(prompts, following), expected)


def test_an_object_missing_part_of_the_protocol_fails_at_build_naming_the_target_and_the_methods() -> None:
    from pcpo_hydra.build import instantiate_algorithm

    node = OmegaConf.create({"_target_": "types.SimpleNamespace", "advantages": 1})
    with pytest.raises(TypeError, match=r"algorithm._target_=types.SimpleNamespace built a SimpleNamespace without "
                                        r"prepare, advantages, update, state_dict, load_state_dict: an algorithm "
                                        r"implements pcpo_hydra.algorithms.base.Algorithm"):
        instantiate_algorithm(node, group_size=2)
