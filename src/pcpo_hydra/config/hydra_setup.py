"""Where the YAML lives and the resolvers it uses: what every entry point needs before Hydra composes.

`pcpo-train`, `pcpo-reward-server`, the command-line checks and the tests all compose conf/; they
take both from here rather than from one another, so no component has to import the training CLI.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> str:
    """conf/ inside an installed wheel, else the top-level conf/ of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no conf/train.yaml next to {package} or in the source tree")


def _if_set(value: object, then: str, otherwise: str) -> str:
    """`then` when `value` is not null: conf/train.yaml sends a resumed run into the dir it continues."""
    return otherwise if value is None else then


def register_resolvers() -> None:
    """Make conf/'s own interpolations (`${pcpo.if_set:...}`) known to OmegaConf; safe to call again."""
    OmegaConf.register_new_resolver("pcpo.if_set", _if_set, replace=True)
