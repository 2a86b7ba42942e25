"""`pcpo-reward-server`: serve any conf/reward option over HTTP to `reward=remote` clients.

    pcpo-reward-server reward=clipscore hardware=gpu1 server.port=8765

Composed by Hydra from conf/reward_server.yaml, with the reward and hardware groups pcpo-train
uses, and checked by the same schemas before anything heavy is imported or the reward is loaded.
The serving itself (batching, endpoints) is in `rewards.http_server`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from pcpo_hydra.config import ConfigError
from pcpo_hydra.config.checks import at_least, checked, interval, positive
from pcpo_hydra.config.command_line import config_error
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.config.validation import check_tree
from pcpo_hydra.rewards.schemas import RemoteRewardSchema


@dataclass
class ServerSchema:
    host: str = MISSING
    port: int = checked(interval(0, 65535))
    max_batch: int = checked(positive())
    max_wait_ms: float = checked(at_least(0.0))


@dataclass
class RewardServerSchema:
    """conf/reward_server.yaml; its reward and hardware groups are checked by the schemas their components registered."""

    server: ServerSchema = MISSING
    reward: Any = MISSING
    hardware: Any = MISSING


def check_config(cfg: DictConfig) -> DictConfig:
    """The server config typed by its schemas (reward and hardware checked as pcpo-train checks them)."""
    typed = check_tree(cfg, RewardServerSchema, ("reward", "hardware"))
    if typed.reward._target_ == RemoteRewardSchema._target_:
        raise ConfigError(["reward=remote: a server must serve a reward of its own; choose another reward option"])
    OmegaConf.set_readonly(typed, True)
    return typed


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="reward_server")
def main(cfg: DictConfig) -> None:
    """Check the config, then (only then importing torch) load the reward and serve it."""
    try:
        cfg = check_config(cfg)
    except ConfigError as exc:
        config_error("pcpo-reward-server", exc)
    import torch

    from pcpo_hydra.rewards.http_server import serve

    if cfg.hardware.num_threads is not None:
        torch.set_num_threads(cfg.hardware.num_threads)
    try:
        reward = instantiate(cfg.reward, _convert_="all")
    except InstantiationException as exc:  # e.g. a ModelLoadError, whose message says what to do
        print(f"pcpo-reward-server: {exc.__cause__ or exc}", file=sys.stderr)
        raise SystemExit(1) from None
    serve(reward, cfg.server)


if __name__ == "__main__":
    main()
