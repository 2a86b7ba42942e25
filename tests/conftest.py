"""Shared fixtures: compose the real config tree exactly as `pcpo-train` does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pcpo_hydra.train import config_dir


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg("algorithm=grpo", ...) -> the composed (not yet validated) config."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose
