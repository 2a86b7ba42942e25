"""`pcpo-sample`: PNGs and a manifest from the base model, a trained policy, or an IRG mixture of policies.

    pcpo-sample policy=outputs/runs/2026-12-01/10-00-00 seeds=[0,1,2,3]
    pcpo-sample irg.policies={aes:<run>,clip:<run>} irg.weights={aes:1.5,clip:0.5}

Composed by Hydra from conf/sample.yaml with pcpo-train's model, sampler, prompts and hardware
groups, and checked (`sampling.config`) before torch is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pcpo_hydra.config import ConfigError
from pcpo_hydra.config.command_line import checked_command, config_error
from pcpo_hydra.config.hydra_setup import config_dir, register_resolvers
from pcpo_hydra.sampling.config import check_config, sources, weights_folder

register_resolvers()  # conf/sample.yaml's output folder reads through them


def main() -> None:
    """The `pcpo-sample` command."""
    checked_command("pcpo-sample", "sample", sample)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sample")
def sample(cfg: DictConfig) -> None:
    try:
        cfg = check_config(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as exc:
        config_error("pcpo-sample", exc)
    from pcpo_hydra.sampling.run import MANIFEST, PolicyLoadError, log_samples, write_samples
    from pcpo_hydra.weights import ModelLoadError

    try:
        manifest = write_samples(cfg, Path(cfg.out), policy_folders(cfg))
    except (PolicyLoadError, ModelLoadError) as exc:  # their messages say what to do; a traceback would bury it
        print(f"pcpo-sample: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"pcpo-sample: {len(manifest['images'])} images in {Path(cfg.out) / MANIFEST}")
    if cfg.log_to_mlflow:
        print(f"pcpo-sample: logged as MLflow run {log_samples(cfg, Path(cfg.out), manifest)}")


def policy_folders(cfg: DictConfig) -> dict[str, Path | None]:
    """{"policy" or irg name: weights folder}, already checked to exist; None for a match at the base model."""
    return {key.rpartition(".")[2]: weights_folder(source, key, cfg.match)[0] for key, source in sources(cfg).items()}


if __name__ == "__main__":
    main()
