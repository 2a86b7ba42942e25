"""The shapes world is a plugin: an outside reward, prompt set, models and recipe plug in with no edit to the core.

benchmarks/shapes_world registers its schemas in its own `schemas` module (found by the registry's
walk of a target's packages) and adds its conf/ through a Hydra SearchPathPlugin. With it on the
path its options compose, validate and train; without it the core runs its embedded default and
refuses the plugin's options in one line; and nothing in the core names the world.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from pcpo_hydra.config import validate

from conftest import SHAPES_WORLD, shapes_world_conf

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("colour", "position", "size", "shape")  # world_all's components
# Hides an installed plugin as well as one on PYTHONPATH: a None in sys.modules makes its import fail,
# and Hydra's plugin scan skips a module whose entry is None.
HIDE_PLUGIN = "import sys; sys.modules['pcpo_shapes_world'] = sys.modules['hydra_plugins.pcpo_shapes_world'] = None"


def plugin_options() -> list[str]:
    return sorted(f"{path.parent.name}={path.stem}" for path in shapes_world_conf().glob("*/*.yaml")
                  if path.parent.name != "recipe")


def pcpo_train_command() -> list[str]:
    script = Path(sys.executable).with_name("pcpo-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pcpo_hydra.train"]


def without_plugin_env() -> dict[str, str]:
    """The environment with the plugin's folder taken off PYTHONPATH (conftest put it there when not installed)."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != SHAPES_WORLD]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(entries)}


# ------------------------------------------------------------------------------------ with the plugin


@pytest.mark.parametrize("override", plugin_options())
def test_every_plugin_option_composes_and_validates(compose_cfg, override: str) -> None:
    cfg = validate(compose_cfg(override, "prompts=world"))
    group = override.split("=")[0]
    targets = [cfg[group]._target_, *(c._target_ for c in cfg[group].get("components", {}).values())]
    # its own components are its package's; its models load through the core's loaders
    expected = "pcpo_hydra.models." if group == "model" else "pcpo_shapes_world."
    assert all(t.startswith(expected) for t in targets if not t.endswith("multi.MultiReward")), targets


def test_the_plugins_schemas_check_its_nodes_before_anything_is_built(compose_cfg) -> None:
    from pcpo_hydra.config import ConfigError

    refused = r"^invalid configuration: reward.components.size.batch_size=0: must be a number > 0$"
    with pytest.raises(ConfigError, match=refused):
        validate(compose_cfg("prompts=world", "reward=world_all", "reward.components.size.batch_size=0"))
    prompts = instantiate(validate(compose_cfg("prompts=world", "prompts.colours=[red]")).prompts)
    assert len(prompts) == 30 and all(" red " in caption for caption in prompts)


@pytest.mark.integration
def test_pcpo_train_trains_the_tiny_default_on_the_worlds_prompts_and_rewards(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file: store only when told to

    store = f"file:{tmp_path / 'mlruns'}"
    result = subprocess.run(
        [*pcpo_train_command(), "experiment=debug", "prompts=world", "reward=world_all", "rollout.prompts_per_epoch=2",
         "rollout.group_size=2", "hardware.num_threads=1", "log_images_every=0", "checkpoint_every=0",
         "text_cache_dir=null", f"logger.tracking_uri={store}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["reward"] == "world_all" and run.data.tags["prompts"] == "world"
    assert run.data.tags["model"] == "tiny_sd"
    parts = {name: run.data.metrics[f"reward/{name}_mean"] for name in PARTS}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in parts.values()), parts
    assert run.data.metrics["rollout/reward_mean"] == pytest.approx(sum(parts.values()) / 4, abs=1e-5)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/colour_mean")] == [1]


# ------------------------------------------------------------------------------------ without it


def test_without_the_plugin_its_options_are_refused_in_one_line_and_the_default_validates(tmp_path: Path) -> None:
    code = (
        f"{HIDE_PLUGIN}\n"
        "from hydra import compose, initialize_config_dir\n"
        "from pcpo_hydra.config import validate\n"
        "from pcpo_hydra.config.hydra_setup import config_dir\n"
        "from pcpo_hydra.train import main\n"
        "with initialize_config_dir(config_dir=config_dir(), version_base='1.3'):\n"
        "    cfg = validate(compose('train'))\n"
        "print('DEFAULT', cfg.model._target_, cfg.reward._target_, cfg.prompts._target_)\n"
        "sys.argv = ['pcpo-train', 'reward=world_all']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=without_plugin_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["DEFAULT", "pcpo_hydra.models.tiny.build_tiny_sd",
                                     "pcpo_hydra.rewards.jpeg.JpegCompressibility", "pcpo_hydra.prompts.simple_animals"]
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "pcpo-train: invalid configuration: reward=world_all: no such option; reward is one of aesthetic, ")
    listed = line.split("reward is one of ")[1].split(" (")[0].split(", ")
    assert "jpeg_compressibility" in listed and "multi" in listed and not any("world" in o for o in listed), listed
    assert "installed" in line


# ------------------------------------------------------------------------------------ the core


def test_nothing_in_the_core_names_the_shapes_world() -> None:
    """No module, option file or text under src/pcpo_hydra/ and conf/ refers to the plugin or its options.

    "world" alone is not looked for: a distributed run's world (size) is another one.
    """
    options = [option.split("=") for option in plugin_options()]
    mentions = re.compile("|".join([
        r"pcpo_shapes_world", r"pcpo_hydra\.world", r"rewards\.world\b", r"(?i:shapes world)",
        *(rf"\b{group}\s*[=:]\s*{name}\b" for group, name in options),
        *(rf"\b{name}\.yaml\b" for _, name in options), r"\bworld_cpu\b", r"\bworld_(all|colour|position|shape|sd3?)\b",
    ]))
    found = []
    for folder in (ROOT / "src" / "pcpo_hydra", ROOT / "conf"):
        for path in sorted(folder.rglob("*")):
            if "world" in path.name:
                found.append(f"{path.relative_to(ROOT)} (its name)")
            elif path.suffix in {".py", ".yaml"}:
                found += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                          for n, line in enumerate(path.read_text().splitlines(), 1) if mentions.search(line)]
    assert found == []
    # the pattern does find the world where it is: in the plugin's own schemas
    schemas = (SHAPES_WORLD / "pcpo_shapes_world" / "schemas.py").read_text().splitlines()
    assert any(mentions.search(line) for line in schemas)
