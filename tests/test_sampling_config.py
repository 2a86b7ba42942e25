"""pcpo-sample's config checks (torch-free): where a policy's weights are, and the run config it brings."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pcpo_hydra.config import ConfigError
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.sampling.config import check_config, weights_folder


def _run_dir(root: Path, final: bool, checkpoints: tuple[int, ...]) -> Path:
    """A run dir as pcpo-train leaves it: its saved config (seed 7, 3 DDIM steps), final weights, checkpoints."""
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        OmegaConf.save(compose("train", overrides=["seed=7", "sampler.num_steps=3"]), run / ".hydra" / "config.yaml")
    if final:
        (run / "final_weights").mkdir()
        (run / "final_weights" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    for epoch in checkpoints:
        checkpoint = run / "checkpoints" / f"epoch_{epoch:05d}"
        (checkpoint / "weights").mkdir(parents=True)
        (checkpoint / "trainer.pt").write_bytes(b"")
    return run


def _checked(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return check_config(compose("sample", overrides=list(overrides)), list(overrides))


def test_a_run_dir_gives_its_final_weights_else_its_newest_checkpoint(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, final=False, checkpoints=(1, 2))
    assert weights_folder(str(run), "policy") == (run / "checkpoints" / "epoch_00002" / "weights", None)
    (run / "final_weights").mkdir()
    assert weights_folder(str(run), "policy") == (run / "final_weights", None)
    folder = run / "final_weights"
    (folder / "adapter_model.safetensors").write_bytes(b"")
    assert weights_folder(str(folder), "irg.policies.a") == (folder, None)
    assert weights_folder(str(tmp_path), "policy")[1] == (
        f"policy={str(tmp_path)!r}: neither a run dir with final_weights or an intact checkpoint, nor a weights "
        "folder (adapter_model.safetensors or diffusion_pytorch_model.safetensors); give one of those")


@pytest.mark.parametrize("source", ["", "final_weights", "checkpoints/epoch_00001/weights"])
def test_a_run_brings_its_model_and_sampler_and_dotted_overrides_still_apply(tmp_path: Path, source: str) -> None:
    run = _run_dir(tmp_path, final=True, checkpoints=(1,))
    if source.endswith("weights") and "checkpoints" in source:
        (run / source / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    cfg = _checked(f"policy={run / source}", "model.guidance_scale=2.0")
    assert (cfg.model.seed, cfg.model.guidance_scale, cfg.sampler.num_steps) == (7, 2.0, 3)
    chosen = _checked(f"policy={run / source}", "model=tiny_sd")  # an option chosen: today's nodes
    assert (chosen.model.seed, chosen.sampler.num_steps) == (0, 10)


def test_policies_of_another_model_and_missing_weights_are_refused_together(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, final=True, checkpoints=())
    with pytest.raises(ConfigError) as error:
        _checked(f"irg.policies={{a:{run}}}", "irg.weights={a:1.0,b:2.0}", "model=tiny_sd3")
    assert error.value.problems == [
        "irg.weights.b: names no policy; set irg.policies.b=<run dir or weights folder>",
        f"irg.policies.a={str(run)!r}: trained model._target_='pcpo_hydra.models.tiny.build_tiny_sd', but this "
        "samples 'pcpo_hydra.models.tiny_sd3.build_tiny_sd3'; every policy must come from the same base model",
    ]
