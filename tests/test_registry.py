"""The schema registry: components register their own schemas; an outside package's are found by its target."""

from __future__ import annotations

import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from pcpo_hydra.config.registry import group_schemas, schema_for


def test_every_core_target_is_registered_by_its_own_package() -> None:
    schemas = group_schemas()
    assert schemas["reward"]["pcpo_hydra.rewards.hpsv2.HPSv2Score"].__module__ == "pcpo_hydra.rewards.schemas"
    assert schemas["sampler"]["pcpo_hydra.samplers.build_ddim_sampler"].__module__ == "pcpo_hydra.samplers.schemas"
    assert schemas["model"]["pcpo_hydra.models.flux.load_flux"].__module__ == "pcpo_hydra.models.schemas"
    assert schemas["hardware"][None].__module__ == "pcpo_hydra.hardware"


def test_an_outside_packages_schema_is_found_by_walking_its_targets_packages(tmp_path, monkeypatch) -> None:
    package = tmp_path / "outside_pkg" / "scores"
    package.mkdir(parents=True)
    (tmp_path / "outside_pkg" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "heavy.py").write_text("raise ImportError('the component module itself must not be imported')\n")
    (package / "schemas.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from pcpo_hydra.config.checks import checked, positive
        from pcpo_hydra.config.registry import register

        @register("reward")
        @dataclass
        class OutsideSchema:
            _target_: str = "outside_pkg.scores.heavy.Score"
            batch_size: int = checked(positive())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(group_schemas(), "reward", dict(group_schemas()["reward"]))  # undone after the test
    node = OmegaConf.create({"_target_": "outside_pkg.scores.heavy.Score", "batch_size": 2})
    schema = schema_for("reward", node)
    assert schema.__name__ == "OutsideSchema" and schema.__module__ == "outside_pkg.scores.schemas"
    assert "outside_pkg.scores.heavy" not in sys.modules
    for name in [m for m in sys.modules if m.startswith("outside_pkg")]:
        monkeypatch.delitem(sys.modules, name)


def test_an_unknown_target_is_named_with_the_known_ones() -> None:
    node = OmegaConf.create({"_target_": "nowhere.Reward"})
    with pytest.raises(KeyError) as info:
        schema_for("reward", node, "reward.components.x")
    message = info.value.args[0]
    assert message.startswith("reward.components.x._target_='nowhere.Reward': must be one of ")
    assert "'pcpo_hydra.rewards.clip_score.ClipScore'" in message
