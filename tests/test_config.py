"""Composition of every group option, and the errors a bad config gives before any model is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.hydra_setup import config_dir

GROUPS = ("model", "sampler", "reward", "algorithm", "hardware", "prompts", "logger", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


# Options that cannot validate with the default model: prompts=file needs its path (tested below);
# the flow samplers need a flow model (tested below with each).
ALONE_INVALID = {("prompts", "file"), ("sampler", "dancegrpo_sde"), ("sampler", "flowgrpo_sde")}
FLOW_MODELS = ("tiny_sd3", "sd35_medium", "tiny_flux", "flux")
FLOW_SAMPLERS = ("dancegrpo_sde", "flowgrpo_sde")


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g) if (g, o) not in ALONE_INVALID]
)
def test_every_group_option_composes_and_validates(compose_cfg, override):
    cfg = validate(compose_cfg(override))
    group, option = override.split("=")
    if group not in ("hardware", "experiment"):
        assert cfg[group]._target_.startswith("pcpo_hydra.")


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_flow_models_bring_a_flow_sampler_take_either_and_refuse_ddim(compose_cfg, model):
    own = {"tiny_sd3": "flowgrpo", "sd35_medium": "flowgrpo", "tiny_flux": "dancegrpo", "flux": "dancegrpo"}[model]
    assert validate(compose_cfg(f"model={model}")).sampler._target_.endswith(f"build_{own}_sampler")
    for sampler in FLOW_SAMPLERS:
        cfg = validate(compose_cfg(f"model={model}", f"sampler={sampler}"))
        assert cfg.sampler._target_.endswith(f"build_{sampler.split('_')[0]}_sampler")
    with pytest.raises(ConfigError, match=r"a diffusion sampler cannot step .* a flow model; use sampler=dancegrpo_sde"):
        validate(compose_cfg(f"model={model}", "sampler=ddim"))


def test_prompt_file_option_needs_its_path(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"prompts.path"):
        validate(compose_cfg("prompts=file"))
    listing = tmp_path / "mine.txt"
    listing.write_text("a red apple\n\na blue car\n")
    assert validate(compose_cfg("prompts=file", f"prompts.path={listing}")).prompts.path == str(listing)


def test_defaults_are_the_embedded_cpu_run(compose_cfg):
    cfg = validate(compose_cfg())
    assert cfg.model._target_.endswith("build_tiny_sd")
    assert cfg.algorithm.objective == "log_hinge" and cfg.algorithm.credit == "proportional"
    assert cfg.hardware.device == "cpu"


def test_grpo_and_pcpo_differ_in_exactly_the_three_switches(compose_cfg):
    grpo, pcpo = (validate(compose_cfg(f"algorithm={a}")).algorithm for a in ("grpo", "pcpo"))
    differing = {k for k in grpo if grpo[k] != pcpo[k]}
    assert differing == {"objective", "log_ratio", "credit"}
    assert (grpo.objective, grpo.log_ratio, grpo.credit) == ("ratio", "direct", "native")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["algorithm.clip_range=-1"], "algorithm.clip_range=-1.0: must be a number > 0"),
        (["algorithm.objective=ppo"], "algorithm.objective='ppo': must be one of 'ratio', 'log_hinge'"),
        (["sampler.num_steps=0"], "sampler.num_steps=0: must be a number > 0"),
        (["train.timestep_fraction=0"], "train.timestep_fraction=0.0: must be a number in (0.0, 1.0]"),
        (["train.timestep_fraction=1.5"], "train.timestep_fraction=1.5: must be a number in (0.0, 1.0]"),
        (["rollout.group_size=1"], "rollout.group_size=1: must be a number >= 2"),
        (["rollout.batch_size=5"], "rollout.batch_size=5: must divide rollout.prompts_per_epoch x rollout.group_size = 32"),
        (["train.batch_size=3"], "train.batch_size=3: must divide"),
        (["train.num_updates=3"], "train.num_updates=3: must divide the 8 training micro-batches"),
        (["rollout.group_size=abc"], "rollout.group_size"),
        (["+algorithm.temperature=2"], "algorithm.temperature"),
        (["model.lora.rank=0"], "model.lora.rank=0: must be a number > 0"),
        (["hardware.mixed_precision=fp8"], "hardware.mixed_precision='fp8': must be one of"),
        (["resume=/nonexistent/run"], "resume='/nonexistent/run': no complete checkpoint"),
        (["algorithm.kl_beta=-0.01"], "algorithm.kl_beta=-0.01: must be a number >= 0"),
        (["model=flux", "model.guidance=-1"], "model.guidance=-1.0: must be a number >= 0"),
        (["model=sd35_medium", "model.max_sequence_length=0"], "model.max_sequence_length=0: must be a number > 0"),
        (["model=tiny_sd3", "+model.guidance=2"], "model.guidance: Key 'guidance' not in 'TinySD3Schema'"),
        (["model.offload_text_encoders=maybe"], "model.offload_text_encoders"),
        (["hardware=cpu2_zero2", "+hardware.deepspeed.stag=1"],
         "hardware.deepspeed.stag: Key 'stag' not in 'DeepSpeedSchema'; did you mean hardware.deepspeed.stage?"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(compose_cfg, overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(*overrides))
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("algorithm.clip_range=0", "sampler.eta=2"))
    assert len(info.value.problems) == 2


def test_unknown_group_option_is_a_hydra_error_listing_the_options(compose_cfg):
    with pytest.raises(MissingConfigException, match="algorithm"):
        compose_cfg("algorithm=ppo")


def test_validated_config_is_read_only(compose_cfg):
    cfg = validate(compose_cfg())
    with pytest.raises(Exception):
        cfg.epochs = 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from pcpo_hydra.train import main\n"
        f"sys.argv = ['pcpo-train', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')\n"
        "sys.exit(code)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_cli_bad_value_fails_fast_without_importing_torch():
    result = run_cli("algorithm.clip_range=-1", "hydra.run.dir=/tmp/pcpo-hydra-test-bad-cfg")
    assert result.returncode == 2
    assert "algorithm.clip_range=-1.0: must be a number > 0" in result.stderr
    assert "TORCH_NOT_IMPORTED" in result.stdout


def test_help_and_cfg_job_do_not_import_torch():
    for args in (["--help"], ["--cfg", "job"]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "TORCH_NOT_IMPORTED" in result.stdout


def test_tiny_models_bring_their_recipe_and_real_models_keep_paper_values(compose_cfg):
    tiny, real = validate(compose_cfg()), validate(compose_cfg("model=sd15"))
    assert (tiny.algorithm.clip_range, tiny.sampler.num_steps, tiny.optim.lr, tiny.epochs) == (0.1, 10, 1e-3, 60)
    assert (real.algorithm.clip_range, real.sampler.num_steps, real.optim.lr, real.epochs) == (1e-4, 50, 1e-4, 100)
    # The command line still wins over a recipe.
    assert validate(compose_cfg("algorithm.clip_range=0.2", "epochs=3")).algorithm.clip_range == 0.2


# The world's options are the shapes-world plugin's (benchmarks/shapes_world; conftest puts it on the path).
@pytest.mark.parametrize("model", ["world_sd", "world_sd3"])
def test_the_worlds_pretrained_models_fine_tune_at_their_recipes_gentler_rate(compose_cfg, model):
    cfg = validate(compose_cfg(f"model={model}", "prompts=world", "reward=world_all"))
    # the tiny recipe's run size and trust region, a tenth of the random tiny SD's learning rate
    assert (cfg.algorithm.clip_range, cfg.sampler.num_steps, cfg.optim.lr, cfg.rollout.group_size) == (0.1, 10, 1e-4, 4)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("dancegrpo_flux_hps", {
            "model._target_": "pcpo_hydra.models.flux.load_flux", "model.lora.rank": 128, "model.lora.alpha": 256.0,
            "model.guidance_scale": 1.0, "sampler.num_steps": 12, "reward._target_": "pcpo_hydra.rewards.hpsv2.HPSv2Score",
            "optim.lr": 3e-4, "train.timestep_fraction": 0.6, "train.num_updates": 4, "algorithm.clip_range": 1e-4,
            "rollout.prompts_per_epoch": 32, "rollout.group_size": 12, "algorithm.kl_beta": 0.0,
        }),
        ("flowgrpo_sd3_ocr", {
            "model._target_": "pcpo_hydra.models.sd3.load_sd3", "model.lora.rank": 32, "model.lora.alpha": 64.0,
            "model.guidance_scale": 4.5, "sampler.num_steps": 10, "sampler.noise_level": 0.7,
            "reward._target_": "pcpo_hydra.rewards.ocr.OcrReward", "optim.lr": 3e-4, "train.num_updates": 2,
            "rollout.prompts_per_epoch": 8, "rollout.group_size": 8, "algorithm.kl_beta": 0.04,
            "algorithm.clip_range": 1e-4,
        }),
    ],
)
@pytest.mark.parametrize("algorithm", ["grpo", "pcpo"])
def test_flow_presets_carry_the_papers_table_7_values(compose_cfg, preset, expected, algorithm):
    cfg = validate(compose_cfg(f"experiment={preset}", f"algorithm={algorithm}"))
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected
    assert cfg.algorithm.objective == ("log_hinge" if algorithm == "pcpo" else "ratio")
