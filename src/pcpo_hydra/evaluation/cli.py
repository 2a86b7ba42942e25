"""`pcpo-eval`: fidelity, diversity, rewards and mixed models of sample folders, as a report.

    pcpo-eval samples={base:outputs/samples/base,grpo:outputs/samples/grpo,pcpo:outputs/samples/pcpo}
    pcpo-eval samples={...} +reward@rewards.hps=hpsv2 weights.torch_hub=/data/torch_hub

Composed by Hydra from conf/evaluate.yaml; the config and the folders are checked before torch is
imported, the metric networks' weights before any network is built (one line each, exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pcpo_hydra.config import ConfigError
from pcpo_hydra.config.command_line import checked_command, config_error
from pcpo_hydra.config.hydra_setup import config_dir, register_resolvers
from pcpo_hydra.evaluation.config import EvaluateSchema, check_config

register_resolvers()


def main() -> None:
    """The `pcpo-eval` command."""
    checked_command("pcpo-eval", "evaluate", evaluate)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def evaluate(cfg: DictConfig) -> None:
    try:
        cfg = check_config(cfg)
        from pcpo_hydra.evaluation.fidelity import weight_problems
        from pcpo_hydra.preflight import need_problems

        problems = weight_problems(cfg.metrics, cfg.weights.torch_hub, cfg.weights.dinov2)
        problems += need_problems(cfg, ("hardware",), root=EvaluateSchema)  # the rewards' needs too
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        config_error("pcpo-eval", exc)
    from pcpo_hydra.evaluation.compare import OVERALL, evaluate as measure, log_evaluation
    from pcpo_hydra.weights import ModelLoadError

    out = Path(cfg.out)
    try:
        report, tables = measure(cfg, out)
    except ModelLoadError as exc:  # a reward's weights: its message says what to set
        print(f"pcpo-eval: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"pcpo-eval: {report}")
    if cfg.log_to_mlflow:
        print(f"pcpo-eval: logged as MLflow run {log_evaluation(cfg, out, tables[OVERALL])}")


if __name__ == "__main__":
    main()
