"""The shapes world: captions, scenes and renders, the world rewards on images with known answers,
the pretraining pieces, and (integration) the pretraining script's cache trained by `pcpo-train`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor

from pcpo_hydra.config import ConfigError, validate
from pcpo_shapes_world.rewards import (
    ColourAgreement, Foreground, PositionAgreement, ShapeAgreement, SizeAgreement, WorldReward, caption_agreements,
)
from pcpo_shapes_world.grammar import COLOURS, POSITIONS, SHAPES, SIZES, Attributes, all_attributes, parse, world_prompts
from pcpo_shapes_world.render import render
from pcpo_shapes_world.scenes import AREA_JITTER, CENTRE_JITTER, COLOUR_JITTER, Scene, exact_scene, sample_scenes

REPO = Path(__file__).resolve().parents[1]
RED_CIRCLE_LEFT = Attributes("red", "circle", "large", "left")
REWARDS = (ColourAgreement(), PositionAgreement(), SizeAgreement(), ShapeAgreement())


def scores(images: Tensor, caption: str) -> dict[str, float]:
    prompts = [caption] * images.shape[0]
    return {reward.name: reward(images, prompts).mean().item() for reward in REWARDS}


def drawn(attributes: Attributes, **changes) -> Tensor:
    """The exact render of `attributes`, with any of centre, area, rgb replaced."""
    exact = exact_scene(attributes)
    return render([Scene(attributes, **{"centre": exact.centre, "area": exact.area, "rgb": exact.rgb, **changes})])


# ---- grammar -----------------------------------------------------------------------------------


def test_every_caption_parses_back_to_its_attributes() -> None:
    attributes = all_attributes()
    assert len(attributes) == len(COLOURS) * len(SHAPES) * len(SIZES) * len(POSITIONS) == 120
    assert RED_CIRCLE_LEFT.caption == "a large red circle on the left"
    assert [parse(a.caption) for a in attributes] == attributes


def test_parse_ignores_case_and_spacing_only() -> None:
    assert parse("  A Large  RED circle on the   left ") == RED_CIRCLE_LEFT
    for other in ("a cat", "a large red circle", "a large red circle on the left!", "a red large circle on the left"):
        with pytest.raises(ValueError, match="not a world caption"):
            parse(other)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        Attributes("red", "hexagon", "large", "left")


def test_world_prompts_are_every_combination_of_the_words_given() -> None:
    everything = world_prompts(list(COLOURS), list(SHAPES), list(SIZES), list(POSITIONS))
    assert len(everything) == 120 and len(set(everything.prompts)) == 120
    circles = world_prompts(["red", "blue"], ["circle"], ["large"], list(POSITIONS))
    assert circles.prompts[:2] == ("a large red circle on the left", "a large red circle on the right")
    assert len(circles) == 10 and all("circle" in p for p in circles.prompts)
    with pytest.raises(ValueError, match="prompts.shapes is empty"):
        world_prompts(["red"], [], ["large"], ["left"])


def test_every_caption_fits_the_world_models_text_length() -> None:
    """The tiny tokenizers spend a token per character: a truncated caption would lose its position."""
    from pcpo_hydra.models.tiny import tiny_t5_tokenizer
    from pcpo_shapes_world.models import TEXT_TOKENS, clip_tokenizer

    captions = [a.caption for a in all_attributes()]
    longest = max(len(ids) for ids in clip_tokenizer()(captions).input_ids)
    assert longest == 33 <= TEXT_TOKENS
    assert max(len(ids) for ids in tiny_t5_tokenizer(TEXT_TOKENS)(captions).input_ids) <= TEXT_TOKENS


def test_the_grammar_and_the_config_schemas_stay_light() -> None:
    """Validation (`pcpo-train --cfg job`) reads the world's vocabulary: it must not pull in torch or numpy."""
    code = ("import sys, pcpo_shapes_world.schemas, pcpo_hydra.config.registry as r; "
            "r.group_schemas(); "
            "assert not {'torch', 'numpy'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- scenes and renders ------------------------------------------------------------------------


def test_scenes_are_a_function_of_count_and_seed() -> None:
    first, again, other = sample_scenes(50, 3), sample_scenes(50, 3), sample_scenes(50, 4)
    assert first == again and first != other
    assert torch.equal(render(first), render(again))


def test_scenes_cover_the_world_and_jitter_only_a_little() -> None:
    scenes = sample_scenes(2000, 0)
    assert {s.caption for s in scenes} == {a.caption for a in all_attributes()}
    for scene in scenes:
        exact = exact_scene(scene.attributes)
        assert max(abs(a - b) for a, b in zip(scene.centre, exact.centre)) <= CENTRE_JITTER
        assert abs(scene.area / exact.area - 1) <= AREA_JITTER
        assert max(abs(a - b) for a, b in zip(scene.rgb, exact.rgb)) <= COLOUR_JITTER + 1e-9


@pytest.mark.parametrize("shape", SHAPES)
def test_a_render_covers_the_captions_area_around_its_position(shape: str) -> None:
    attributes = Attributes("blue", shape, "large", "bottom")
    image = drawn(attributes)
    assert image.shape == (1, 3, 32, 32) and 0 <= image.min() and image.max() <= 1
    coverage = image[0, 2] / COLOURS["blue"][2]  # blue's share of each pixel
    assert coverage.mean().item() == pytest.approx(SIZES["large"], rel=0.03)  # 4x4 sub-pixels: edges in 1/128 steps
    x = (torch.arange(32) + 0.5) / 32
    centroid = ((coverage * x[None, :]).sum() / coverage.sum(), (coverage * x[:, None]).sum() / coverage.sum())
    assert centroid == pytest.approx(POSITIONS["bottom"], abs=0.01)
    assert torch.allclose(image[0, :, 24, 16], torch.tensor(COLOURS["blue"]))  # the centroid's pixel
    assert torch.equal(image[0, :, 0, 0], torch.zeros(3))                       # a corner: background


# ---- rewards -----------------------------------------------------------------------------------


def test_the_exact_render_agrees_with_its_caption_and_not_with_an_opposite_one() -> None:
    image = drawn(RED_CIRCLE_LEFT)
    agree = scores(image, RED_CIRCLE_LEFT.caption)
    assert agree["world_colour"] == pytest.approx(1.0)
    assert agree["world_position"] == pytest.approx(1.0, abs=0.01)
    assert agree["world_size"] == pytest.approx(1.0, abs=0.01)
    assert agree["world_shape"] > 0.9
    opposite = scores(image, "a small blue square on the right")
    assert opposite["world_colour"] == opposite["world_position"] == 0.0
    assert opposite["world_size"] == pytest.approx(0.0, abs=0.01)
    assert opposite["world_shape"] < 0.1  # a circle read as a square


def test_colour_is_the_share_of_the_foreground_in_the_captions_colour() -> None:
    image = torch.zeros(1, 3, 32, 32)
    image[0, :, 8:16, 8:24] = torch.tensor(COLOURS["red"])[:, None, None]
    image[0, :, 16:24, 8:24] = torch.tensor(COLOURS["green"])[:, None, None]
    assert ColourAgreement()(image, ["a large red square in the centre"]).item() == pytest.approx(0.5)
    assert ColourAgreement()(image, ["a large blue square in the centre"]).item() == 0.0
    dim_edge = image * 0.6  # a blend of red and background is still red
    assert ColourAgreement()(dim_edge, ["a large green square in the centre"]).item() == pytest.approx(0.5)


@pytest.mark.parametrize(("offset", "expected"), [(0.0, 1.0), (0.0625, 0.75), (0.125, 0.5), (0.25, 0.0), (0.4, 0.0)])
def test_position_falls_linearly_to_zero_one_position_step_away(offset: float, expected: float) -> None:
    left = POSITIONS["left"]
    image = drawn(RED_CIRCLE_LEFT, centre=(left[0] + offset, left[1]))
    assert PositionAgreement()(image, [RED_CIRCLE_LEFT.caption]).item() == pytest.approx(expected, abs=0.02)


def test_size_is_zero_at_the_other_size_and_half_at_their_geometric_mean() -> None:
    halfway = math.sqrt(SIZES["small"] * SIZES["large"])
    for area, expected_large, expected_small in ((SIZES["large"], 1.0, 0.0), (halfway, 0.5, 0.5), (SIZES["small"], 0.0, 1.0)):
        image = drawn(Attributes("green", "circle", "large", "centre"), area=area)
        large, small = (SizeAgreement()(image, [f"a {s} green circle in the centre"]).item() for s in ("large", "small"))
        assert (large, small) == pytest.approx((expected_large, expected_small), abs=0.05)


@pytest.mark.parametrize("size", SIZES)
def test_shape_reads_every_shape_at_every_size(size: str) -> None:
    images = torch.cat([drawn(Attributes("yellow", shape, size, "top")) for shape in SHAPES])
    for asked in SHAPES:
        caption = Attributes("yellow", asked, size, "top").caption
        got = ShapeAgreement()(images, [caption] * len(SHAPES))
        for shape, value in zip(SHAPES, got.tolist()):
            assert (value > 0.8) if shape == asked else (value < 0.2), (asked, shape, value)


def test_an_empty_image_scores_zero_and_noise_scores_near_chance() -> None:
    assert set(scores(torch.zeros(2, 3, 32, 32), RED_CIRCLE_LEFT.caption).values()) == {0.0}
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    by_reward = scores(noise, RED_CIRCLE_LEFT.caption)
    shares = [ColourAgreement()(noise, [f"a large {c} circle on the left"] * 64).mean().item() for c in COLOURS]
    assert sum(shares) == pytest.approx(1.0) and max(shares) < 0.5  # every foreground pixel has one colour
    assert by_reward["world_size"] == 0.0  # far too large
    assert by_reward["world_position"] == pytest.approx(0.0, abs=0.02)  # centred: one position step from the left
    assert by_reward["world_shape"] == pytest.approx(1 / 3, abs=0.05)


def test_foreground_weights_blends_and_ignores_haze() -> None:
    image = drawn(RED_CIRCLE_LEFT)
    found = Foreground(image + 0.04 * torch.rand(image.shape, generator=torch.Generator().manual_seed(0)))
    assert found.area.item() == pytest.approx(SIZES["large"], rel=0.03)


def test_a_prompt_outside_the_world_is_an_error() -> None:
    with pytest.raises(ValueError, match="'a cat' is not a world caption.*prompts=world"):
        ColourAgreement()(torch.zeros(1, 3, 32, 32), ["a cat"])


def test_world_all_is_the_mean_of_the_four_parts(compose_cfg) -> None:
    cfg = validate(compose_cfg("prompts=world", "reward=world_all"))
    reward = instantiate(cfg.reward, _convert_="all")
    images = torch.cat([drawn(RED_CIRCLE_LEFT), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    total, parts = reward.score_parts(images, [RED_CIRCLE_LEFT.caption] * 2)
    assert set(parts) == {"colour", "position", "size", "shape"}
    assert all(isinstance(r, WorldReward) for r in reward.components.values())
    # the scripts' stand-alone scoring (caption_agreements) averages exactly world_all's parts
    assert [type(r) for r in caption_agreements()] == [type(r) for r in reward.components.values()]
    assert torch.allclose(total, torch.stack(list(parts.values())).mean(0))
    assert total[0] > 0.95 > 0.5 > total[1]


def test_prompt_words_are_checked_before_anything_is_built(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"prompts.shapes=\['hexagon'\]: must be a non-empty list of circle, square, triangle"):
        validate(compose_cfg("prompts=world", "prompts.shapes=[hexagon]"))
    prompts = instantiate(validate(compose_cfg("prompts=world", "prompts.sizes=[small]")).prompts)
    assert len(prompts) == 60


# ---- pretraining pieces -------------------------------------------------------------------------


def test_pretraining_encodes_text_as_the_policy_does_but_with_gradients() -> None:
    from pcpo_shapes_world.models import build_world_sd, world_vae
    from pcpo_shapes_world.pretrain import encode_with_grad

    policy = build_world_sd(world_vae())
    captions = [RED_CIRCLE_LEFT.caption, "", RED_CIRCLE_LEFT.caption]
    policy.text_encoder.requires_grad_(True)
    encoded = encode_with_grad(policy, captions)["prompt_embeds"]
    assert torch.allclose(encoded, policy.encode_prompts(captions)["prompt_embeds"])
    encoded.sum().backward()
    assert policy.text_encoder.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shift", [False, True])
def test_latent_scale_makes_the_denoisers_latents_standard(shift: bool) -> None:
    from pcpo_shapes_world.models import build_world_sd, world_vae
    from pcpo_shapes_world.pretrain import Latents, scaled_latents, with_latent_scale

    g = torch.Generator().manual_seed(0)
    means = 0.3 + 2.0 * torch.randn(64, 4, 16, 16, generator=g)
    latents = Latents(means, torch.zeros(64, 4, 16, 16))
    policy = build_world_sd(with_latent_scale(world_vae(), latents, shift))
    x0 = scaled_latents(policy, latents, torch.arange(64), g)
    assert x0.std().item() == pytest.approx(1.0, abs=1e-4)
    assert x0.mean().item() == pytest.approx(0.0 if shift else (means.mean() / means.std()).item(), abs=1e-4)


# ---- the pretraining script, its cache and a pcpo-train epoch on it -----------------------------


@pytest.mark.integration
def test_pretraining_caches_models_the_loaders_read_and_pcpo_train_fine_tunes(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pcpo_hydra.models.sd3 import load_sd3
    from pcpo_hydra.models.stable_diffusion import load_stable_diffusion

    out = tmp_path / "world_models"
    script = [sys.executable, str(REPO / "benchmarks" / "pretrain_world.py"), "--out", str(out), "--steps", "3",
              "--vae-steps", "3", "--data", "128", "--batch-size", "8", "--eval-samples", "4", "--threads", "1"]
    first = subprocess.run(script, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode == 0, first.stderr[-4000:]
    for part in ("vae/config.json", "sd/model_index.json", "sd3/model_index.json", "sd_samples.png", "sd3_samples.png"):
        assert (out / part).is_file(), part
    report = json.loads((out / "sd3_report.json").read_text())
    assert report["train"]["steps"] == 3 and len(report["train"]["loss_by_fifths"]) == 3
    assert report["rewards"]["ground truth"]["world_colour"] == pytest.approx(1.0)
    assert set(report["rewards"]) == {"ground truth", "noise", "samples (flowgrpo_sde)", "samples (dancegrpo_sde)"}

    again = subprocess.run([*script, "--models", "sd"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0 and "vae: cached" in again.stdout and "sd: cached" in again.stdout

    sd, sd3 = load_stable_diffusion(str(out / "sd"), guidance_scale=5.0), load_sd3(str(out / "sd3"), max_sequence_length=40)
    assert sd.latent_shape == sd3.latent_shape == (4, 16, 16)
    assert sd3.vae.config.shift_factor is not None and sd.vae.config.shift_factor is None

    store = tmp_path / "mlflow.db"
    train = subprocess.run(
        [sys.executable, "-m", "pcpo_hydra.train", "experiment=debug", "model=world_sd", f"model.pretrained={out / 'sd'}",
         "prompts=world", "reward=world_all", "rollout.prompts_per_epoch=2", "rollout.group_size=2",
         "hardware.num_threads=1", "log_images_every=0", "checkpoint_every=0", f"hydra.run.dir={tmp_path / 'run'}"],
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{store}")
    run = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])[0]
    metrics = run.data.metrics
    parts = [metrics[f"reward/{name}_mean"] for name in ("colour", "position", "size", "shape")]
    assert all(0.0 <= value <= 1.0 for value in parts)
    assert metrics["rollout/reward_mean"] == pytest.approx(sum(parts) / 4, abs=1e-5)
    assert run.data.tags["model"] == "world_sd" and run.data.tags["reward"] == "world_all"
