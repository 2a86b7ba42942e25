"""The `eval` group: held-out prompts never trained on, fixed-noise images, logged rewards, drift and grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.prompts import PromptSet, simple_animals, split_holdout

TINY = ["experiment=debug", "sampler.num_steps=2", "hardware.num_threads=1", "checkpoint_every=0", "log_images_every=0"]
EVAL = ["eval=holdout", "eval.holdout=2", "eval.group_size=2"]


def test_the_holdout_is_evenly_spaced_disjoint_from_training_and_the_same_each_time() -> None:
    prompts = PromptSet("p", tuple(f"p{k}" for k in range(10)))
    train, held = split_holdout(prompts, 3)
    assert held.prompts == ("p0", "p3", "p6")
    assert train.prompts == ("p1", "p2", "p4", "p5", "p7", "p8", "p9")
    assert split_holdout(prompts, 3) == (train, held)
    with pytest.raises(ValueError, match=r"eval.holdout=10: must be between 1 and 9 for the 10 prompts of 'p'"):
        split_holdout(prompts, 10)


@pytest.mark.parametrize("overrides, expected", [
    (["eval.seed=-1"], "eval.seed=-1: must be a number in [0, 4294967295]"),
    (["eval.every=-1"], "eval.every=-1: must be a number >= 0"),
    (["eval.holdout=0"], "eval.holdout=0: evaluation (eval.every=10) needs held-out prompts; set eval.holdout>=1, "
                         "or give a prompt set: +prompts@eval.prompts=<option>"),
    (["+prompts@eval.prompts=activities"], "eval.holdout=4: eval.prompts is set, so nothing is held out of "
                                           "training; set eval.holdout=0"),
    (["eval.holdout=0", "+prompts@eval.prompts=file", "eval.prompts.path=/nonexistent.txt"], "eval.prompts.path="),
    (["eval.group_size=0"], "eval.group_size=0: must be a number > 0"),
    (["+eval.rewards.extra={_target_: nope}"], "eval.rewards.extra._target_='nope': must be one of"),
    (["+reward@eval.rewards.aes=aesthetic", "eval.rewards.aes.batch_size=0"],
     "eval.rewards.aes.batch_size=0: must be a number > 0"),
    (["+eval.sampler={_target_: pcpo_hydra.samplers.build_ddim_sampler, num_steps: 0, eta: 1.0, sde_window: null}"],
     "eval.sampler.num_steps=0: must be a number > 0"),
])
def test_a_bad_eval_key_is_one_line_naming_it(compose_cfg, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("eval=holdout", *overrides))
    assert str(info.value).startswith(f"invalid configuration: {expected}")
    assert "\n" not in str(info.value)


@pytest.mark.integration
def test_the_eval_sampler_and_rewards_are_preflighted_like_the_training_ones(compose_cfg) -> None:
    from pcpo_hydra.preflight import component_nodes, preflight

    cfg = validate(compose_cfg("eval=holdout", "+sampler@eval.sampler=ddim", "+reward@eval.rewards.text=ocr",
                               "eval.rewards.text.tesseract_cmd=/nonexistent/t"))
    keys = [key for key, _, _ in component_nodes(cfg)]
    assert {"eval.sampler", "eval.rewards.text"} <= set(keys)
    with pytest.raises(ConfigError, match=r"eval\.rewards\.text \(pcpo_hydra\.rewards\.ocr\.OcrReward\) needs"):
        preflight(cfg, Path("unused"))


def test_training_never_draws_the_held_out_prompts_and_draws_as_before_without_evaluation(
    compose_cfg, tmp_path: Path
) -> None:
    from pcpo_hydra.build import build_trainer

    held = set(split_holdout(simple_animals(), 4)[1].prompts)
    evaluating = build_trainer(validate(compose_cfg(*TINY, "eval=holdout")), tmp_path / "a", track=False)
    assert set(evaluating.parts.prompts.prompts) == set(simple_animals().prompts) - held
    draws = {p for _ in range(200) for p in evaluating.layout.draw_prompts(evaluating.parts.prompts,
                                                                            evaluating.prompt_generator)}
    assert not draws & held and len(draws) == 41  # 400 draws reach every training prompt, no held-out one
    # eval off (the default), or holdout set but every 0: the whole set, drawn exactly as before the eval group
    for overrides in ([], ["eval.holdout=4"]):
        plain = build_trainer(validate(compose_cfg(*TINY, *overrides)), tmp_path / "b", track=False)
        assert plain.parts.prompts == simple_animals() and not plain.callbacks


def _base_images(compose_cfg, run_dir: Path, *overrides: str) -> torch.Tensor:
    from pcpo_hydra.build import build_trainer
    from pcpo_hydra.evaluation.callback import evaluation_callbacks

    cfg = validate(compose_cfg(*TINY, *EVAL, *overrides))
    (evaluation,) = evaluation_callbacks(cfg)
    trainer = build_trainer(cfg, run_dir, track=False, callbacks=[evaluation])
    metrics = evaluation.maybe_evaluate(trainer, 0)
    assert metrics["eval/drift"] == 0.0
    return evaluation.base


@pytest.mark.integration
def test_the_evaluation_images_are_the_same_in_two_runs_with_the_same_seed(compose_cfg, tmp_path: Path) -> None:
    first = _base_images(compose_cfg, tmp_path / "a")
    assert first.shape[0] == 4  # 2 held-out prompts x 2 images
    assert torch.equal(first, _base_images(compose_cfg, tmp_path / "b"))
    assert torch.equal(first, torch.load(tmp_path / "a" / "eval_base_images.pt"))  # what a resumed run loads
    assert not torch.allclose(first, _base_images(compose_cfg, tmp_path / "c", "eval.seed=7"))


@pytest.mark.integration
def test_a_resumed_run_measures_drift_from_the_base_images_its_first_launch_saved(compose_cfg, tmp_path: Path) -> None:
    from pcpo_hydra.build import build_trainer
    from pcpo_hydra.evaluation.callback import Evaluation

    _base_images(compose_cfg, tmp_path / "run")
    cfg = validate(compose_cfg(*TINY, *EVAL))
    for run_dir, drift in ((tmp_path / "run", 0.0), (tmp_path / "elsewhere", None)):
        evaluation = Evaluation(cfg.eval)
        trainer = build_trainer(cfg, run_dir, track=False, callbacks=[evaluation])
        trainer.epoch = 1  # as resume_from_checkpoint leaves it: epoch 0 is not evaluated again
        measured = evaluation.maybe_evaluate(trainer, 1)["eval/drift"]
        # the same (untrained) weights: no drift from the saved images; without them, NaN rather than a guess
        assert measured == 0.0 if drift == 0.0 else math.isnan(measured)


@pytest.mark.integration
def test_a_run_logs_each_reward_drift_and_a_grid_at_epoch_0_every_and_the_last_epoch(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    from pcpo_hydra.build import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = validate(compose_cfg(*TINY, *EVAL, "eval.every=2", "epochs=3", "+reward@eval.rewards.size=jpeg_incompressibility",
                               f"text_cache_dir={tmp_path / 'cache'}"))
    run(cfg, tmp_path / "run", {}, [], {"job": "eval"})
    client = MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    history = {key: {m.step: m.value for m in client.get_metric_history(logged.info.run_id, key)}
               for key in ("eval/reward_mean", "eval/reward_std", "eval/size_mean", "eval/size_std", "eval/drift")}
    for key, values in history.items():
        assert set(values) == {0, 2, 3}, key
    assert history["eval/drift"][0] == 0.0 and history["eval/drift"][3] > 0.0
    # incompressibility is the JPEG size, compressibility its negative: the same images give opposite scores
    for step in (0, 2, 3):
        assert history["eval/size_mean"][step] == pytest.approx(-history["eval/reward_mean"][step])
        assert history["eval/size_std"][step] == pytest.approx(history["eval/reward_std"][step])
    grids = {a.path for a in client.list_artifacts(logged.info.run_id, "eval")}
    assert grids == {"eval/epoch_00000.png", "eval/epoch_00002.png", "eval/epoch_00003.png"}
    # the run dir keeps the same numbers, one line per evaluation, for matched-reward checkpoint choice
    lines = [json.loads(line) for line in (tmp_path / "run" / "eval_history.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 2, 3]
    for line in lines:
        for key, values in history.items():
            assert line[key] == pytest.approx(values[line["epoch"]]), key


@pytest.mark.integration
def test_evaluation_is_deterministic_sampling_with_seed_plus_j_as_pcpo_sample_draws(compose_cfg, tmp_path: Path) -> None:
    from pcpo_hydra.build import build_trainer
    from pcpo_hydra.evaluation.callback import Evaluation
    from pcpo_hydra.sampling.guidance import sample_images

    cfg = validate(compose_cfg(*TINY, *EVAL, "eval.holdout=0", "+prompts@eval.prompts=list", "eval.seed=11"))
    evaluation = Evaluation(cfg.eval)
    trainer = build_trainer(cfg, tmp_path / "run", track=False, callbacks=[evaluation])
    assert len(trainer.parts.prompts) == 45  # a prompt set of its own: training keeps all of its prompts
    evaluation.maybe_evaluate(trainer, 0)
    prompts = ["a red car", "a dog on a beach", "a bowl of fruit"]
    assert evaluation.prompts == [p for p in prompts for _ in range(2)] and evaluation.seeds == [11, 12] * 3
    assert evaluation.sampler.stds().abs().max() == 0.0  # DDIM at eta 0: no noise after the first latent
    model, sampler = trainer.parts.model, trainer.parts.sampler.deterministic()
    expected = sample_images(model, sampler, evaluation.prompts, [11, 12] * 3, batch_size=1)
    assert torch.allclose(evaluation.base, expected, atol=1e-5)  # any batching: each image's noise is its seed's
    noisy = Evaluation(validate(compose_cfg(*TINY, *EVAL, "eval.deterministic=false")).eval)
    assert noisy.maybe_evaluate(build_trainer(cfg, tmp_path / "b", track=False, callbacks=[noisy]), 0) is not None
    assert noisy.sampler.stds().abs().max() > 0.0
