"""pcpo-eval's config: its schema, and the sample folders it compares, checked before any network is built.

Torch-free, so a bad key or a folder that does not fit the others fails in a second; the metric
networks' weights are looked for next (`evaluation.fidelity.weight_problems`), still before any is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pcpo_hydra.config.checks import checked, positive
from pcpo_hydra.config.registry import Nested
from pcpo_hydra.config.validation import ConfigError, check_tree
from pcpo_hydra.paths import unwritable
from pcpo_hydra.preflight import device_problems
from pcpo_hydra.sampling.config import MANIFEST

GROUPS = ("hardware", "logger")
METRICS = ("fid", "fd_dinov2", "inception_score", "lpips_diversity")  # what evaluation.fidelity computes


@dataclass
class WeightsSchema:
    torch_hub: Optional[str] = MISSING  # torch.hub-style folder (checkpoints/<file>); null: torch's own
    dinov2: str = MISSING               # hub id or local folder


@dataclass
class EvaluateSchema:
    """conf/evaluate.yaml; the reward nodes are checked by the reward schemas, as the eval group's are."""

    samples: dict[str, str] = MISSING
    reference: str = MISSING
    baseline: Optional[str] = MISSING
    metrics: list[str] = MISSING
    rewards: dict[str, Any] = MISSING
    weights: WeightsSchema = MISSING
    batch_size: int = checked(positive())
    out: str = MISSING
    log_to_mlflow: bool = MISSING
    run_name: Optional[str] = MISSING
    hardware: Any = MISSING
    logger: Any = MISSING

    NESTED: ClassVar[dict[str, Nested]] = {"rewards": Nested("reward", may_be_empty=True)}


def manifest(folder: str) -> dict[str, Any] | None:
    """A sample folder's manifest.json, or None when there is none."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def image_keys(found: dict[str, Any]) -> list[tuple[str, int]]:
    """(prompt, seed) of each image of a manifest, in its order."""
    return [(entry["prompt"], int(entry["seed"])) for entry in found["images"]]


def image_files(found: dict[str, Any]) -> dict[tuple[str, int], str]:
    """(prompt, seed) -> the image's file name, of a manifest."""
    return dict(zip(image_keys(found), (entry["file"] for entry in found["images"])))


def _sample_problems(cfg: DictConfig) -> list[str]:
    """Every folder a pcpo-sample folder, the reference and baseline among them, all of the same images."""
    problems = []
    found = {}
    for name, folder in cfg.samples.items():
        loaded = manifest(folder)
        if loaded is None:
            problems.append(f"samples.{name}={folder!r}: no {MANIFEST} there; give a folder pcpo-sample wrote (its out=)")
        else:
            found[name] = loaded
    for key in ("reference", "baseline"):
        value = cfg[key]
        if value is not None and value not in cfg.samples:
            problems.append(f"{key}={value!r}: names no samples; one of {', '.join(cfg.samples)}")
    unknown = sorted(set(cfg.metrics) - set(METRICS))
    if unknown:
        problems.append(f"metrics={list(cfg.metrics)}: unknown {', '.join(unknown)}; any of {', '.join(METRICS)}")
    if cfg.reference in found:
        expected = sorted(image_keys(found[cfg.reference]))
        for name, loaded in found.items():
            if sorted(image_keys(loaded)) != expected:
                problems.append(f"samples.{name}: its (prompt, seed) pairs differ from samples.{cfg.reference}'s; "
                                "sample every folder with the same prompts, max_prompts and seeds")
    if len(cfg.samples) < 2:
        problems.append(f"samples: {len(cfg.samples)} folder(s); give the reference and at least one policy")
    return problems


def check_config(cfg: DictConfig) -> DictConfig:
    """The typed config with its folders checked, or ConfigError listing every problem."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"{exc.full_key}: {exc.msg}"]) from None
    cfg = OmegaConf.create({f.name: resolved[f.name] for f in fields(EvaluateSchema) if f.name in resolved})
    typed = check_tree(cfg, EvaluateSchema, GROUPS)
    problems = _sample_problems(typed) + device_problems(typed.hardware)
    why = unwritable(Path(typed.out))
    if why:
        problems.append(f"out={typed.out!r}: cannot write there ({why}); set out=<writable folder>")
    if problems:
        raise ConfigError(problems)
    OmegaConf.set_readonly(typed, True)
    return typed
