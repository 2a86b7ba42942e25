"""What a valid config needs from this machine, checked after validation and before anything heavy.

`validate(cfg)` judges the config alone; this asks the machine: the modules, executables and
servers each component declares in its schema's NEEDS, folders the run writes, the MLflow store
and the devices `hardware` asks for. Every problem is one line naming the key, the value and the
fix, raised together as a ConfigError (exit status 2), so a run that cannot work fails in about a
second instead of after the model is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from glob import glob
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pcpo_hydra.checkpoint import checkpoint_root
from pcpo_hydra.config import ConfigError
from pcpo_hydra.config.registry import group_schemas, nested_nodes, schema_for
from pcpo_hydra.mlflow_store import store_problem
from pcpo_hydra.paths import unwritable


def preflight(cfg: DictConfig, run_dir: Path) -> None:
    """Raise ConfigError listing everything this machine lacks for the validated `cfg` run in `run_dir`."""
    problems = need_problems(cfg)
    problems += folder_problems(cfg, run_dir)
    store = store_problem(cfg.logger.tracking_uri)
    if store:
        problems.append(store)
    problems += device_problems(cfg.hardware)
    if problems:
        raise ConfigError(problems)


def need_problems(cfg: DictConfig, groups: Iterable[str] | None = None, root: type | None = None) -> list[str]:
    """What the NEEDS of the nodes of `groups` (default: every registered group), nested ones included, lack;
    with `root` (a command's schema), also those of the nodes its NESTED declares (pcpo-eval's rewards)."""
    return [problem for key, schema, node in component_nodes(cfg, groups, root)
            for need in getattr(schema, "NEEDS", ()) if (problem := need.problem(node, key))]


def _walk(group: str, node: Any, key: str) -> Iterator[tuple[str, type, Any]]:
    schema = schema_for(group, node, key)
    yield key, schema, node
    for _, spec, child_key, _, child in nested_nodes(schema, node, key):
        yield from _walk(spec.group, child, child_key)


def component_nodes(
    cfg: DictConfig, groups: Iterable[str] | None = None, root: type | None = None
) -> Iterator[tuple[str, type, Any]]:
    """(key, schema, node) of every node of `groups` (default: all), of the nodes nested in them, and of
    those nested in the root config by `root`'s NESTED."""
    for group in group_schemas() if groups is None else groups:
        yield from _walk(group, cfg[group], group)
    if root is not None:
        for _, spec, key, _, child in nested_nodes(root, cfg, ""):
            yield from _walk(spec.group, child, key)


def folder_problems(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The folders the run writes before its first epoch ends: checkpoints, and the text cache."""
    folders = [(f"hydra.run.dir={str(run_dir)!r}", "its checkpoints/", checkpoint_root(run_dir),
                "set hydra.run.dir=<writable folder>")]
    if cfg.text_cache_dir is not None:
        folders.append((f"text_cache_dir={cfg.text_cache_dir!r}", "there", Path(cfg.text_cache_dir),
                        "set text_cache_dir=<writable folder>, or text_cache_dir=null (in memory only)"))
    return [f"{key}: cannot write {what} ({problem}); fix: {fix}"
            for key, what, folder, fix in folders if (problem := unwritable(folder))]


def device_problems(hardware: DictConfig) -> list[str]:
    """hardware.device=cuda with no GPU, or fewer GPUs than the ranks this process would spawn.

    Without NVIDIA's device files no CUDA can work, which is known without importing torch;
    otherwise torch counts what CUDA_VISIBLE_DEVICES leaves (without initialising CUDA).
    """
    if hardware.device != "cuda":
        return []
    fix = "use hardware=cpu (hardware=cpu2_zero2: two ranks on CPU)"
    if not glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/dxg"):  # /dev/dxg: CUDA under WSL
        return [f"hardware.device='cuda': this machine has no NVIDIA GPU (no /dev/nvidia*); {fix}"]
    import torch

    visible = torch.cuda.device_count()
    if visible == 0:
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        return [f"hardware.device='cuda': {build} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); {fix}, or install a CUDA build of torch"]
    # Under torchrun or a submitit job (SUBMITIT_EXECUTOR) this process is one rank, given its GPU by the launcher.
    launched = "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR")
    spawned = 1 if launched else hardware.processes_per_node
    if spawned > visible:
        return [f"hardware.processes_per_node={hardware.processes_per_node}: one rank per GPU, but {visible} "
                f"CUDA device(s) are visible; set hardware.processes_per_node={visible} (or hardware=gpu1)"]
    return []
