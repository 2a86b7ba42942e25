"""`train.cfg=false`: rollout and update sample and recompute without classifier-free guidance; evaluation keeps it."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from pcpo_hydra.build import build_trainer
from pcpo_hydra.config import validate
from pcpo_hydra.evaluation.callback import evaluation_callbacks
from pcpo_hydra.models.tiny import build_tiny_sd
from pcpo_hydra.rollout import sample_trajectories
from pcpo_hydra.samplers import build_ddim_sampler

TINY = ["experiment=debug", "sampler.num_steps=3", "rollout.group_size=2", "rollout.batch_size=4",
        "train.batch_size=2", "hardware.num_threads=1", "checkpoint_every=0", "log_images_every=0"]
STEPS = 3


class CallLog:
    """Wraps a model's raw network call and records the batch size of each call."""

    def __init__(self, model) -> None:
        self.batches: list[int] = []
        raw = model.forward_network

        def counted(network, latents, timestep, cond):
            self.batches.append(latents.shape[0])
            return raw(network, latents, timestep, cond)

        model.forward_network = counted


def test_unguided_rollout_stores_the_conditional_output_of_one_call_per_step_and_recomputes_it_exactly() -> None:
    model = build_tiny_sd(seed=0, resolution=16, guidance_scale=5.0)
    model.keep_reference()  # the KL penalty's reference: the frozen starting copy, equal to the policy here
    sampler = build_ddim_sampler(model, STEPS, 1.0)
    calls = CallLog(model)
    with model.guided(False):
        traj = sample_trajectories(model, sampler, ["cat", "cat", "dog", "dog"], 4, [torch.Generator().manual_seed(0)])
    assert calls.batches == [4] * STEPS  # one call on the batch per step, not one on the doubled batch
    assert model.guidance_scale == 5.0  # the user's scale is untouched
    with torch.no_grad():
        for i in range(STEPS):
            x, t = traj.latents[:, i], sampler.timestep(i)
            conditional = model.forward_network(model.network, x, torch.as_tensor(t), traj.cond).float()
            assert torch.equal(traj.outputs[:, i], conditional)
            with model.guided(False):  # the update's recomputation at unchanged weights: log-ratio exactly 0
                assert torch.equal(model.predict(x, t, traj.cond).float(), traj.outputs[:, i])
                assert torch.equal(model.predict_reference(x, t, traj.cond).float(), traj.outputs[:, i])
            guided = model.predict(x, t, traj.cond).float()  # outside: the CFG scale again, a different output
            assert not torch.allclose(guided, conditional)
    assert calls.batches[-1] == 8  # the guided call outside the context ran on the doubled batch


def one_epoch(compose_cfg, tmp_path: Path, *overrides: str, seam: bool = True):
    """A trainer after one epoch (with its rollout's network calls logged) and what the epoch returned.

    `seam=False` takes `model.guided` away, so the epoch runs the code path from before train.cfg existed.
    """
    trainer = build_trainer(validate(compose_cfg(*TINY, *overrides)), tmp_path, track=False)
    model = trainer.parts.model
    if not seam:
        model.guided = lambda enabled: nullcontext()
    calls = CallLog(model)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    traj, rewards, stats = trainer.run_epoch(1)
    return trainer, calls, before, traj, rewards, stats


def test_unguided_training_trains_with_one_call_per_step_and_evaluation_keeps_the_cfg_scale(compose_cfg, tmp_path) -> None:
    trainer, calls, before, traj, _, stats = one_epoch(
        compose_cfg, tmp_path, "train.cfg=false", "eval=holdout", "eval.holdout=2", "eval.group_size=2",
        "eval.every=1")
    samples = len(traj)
    rollout_calls = samples // 4 * STEPS
    assert calls.batches[:rollout_calls] == [4] * rollout_calls
    # the update: one call per forward, on train.batch_size samples x all 3 steps (the tiny recipe's
    # train.steps_per_forward), not on the doubled batch
    assert calls.batches[rollout_calls:] == [2 * STEPS] * (samples // 2)
    after = list(trainer.parts.model.trainable_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # it trained
    assert stats["train/num_updates"] == 1 and stats["train/grad_norm"] > 0

    calls.batches.clear()
    (evaluation,) = evaluation_callbacks(trainer.cfg)
    evaluation.maybe_evaluate(trainer, 1)
    assert calls.batches and set(calls.batches) == {8}  # 4 eval images on the doubled batch: guided at scale 5
    assert trainer.parts.model.guidance_scale == 5.0


def test_training_with_cfg_is_bit_identical_to_the_code_path_before_the_switch(compose_cfg, tmp_path) -> None:
    runs = [one_epoch(compose_cfg, tmp_path / name, seam=seam) for name, seam in (("new", True), ("old", False))]
    (new, new_calls, _, new_traj, new_rewards, new_stats), (old, old_calls, _, _, old_rewards, old_stats) = runs
    assert new_calls.batches == old_calls.batches and new_calls.batches == [8] * STEPS + [12, 12]  # doubled batches
    assert torch.equal(new_rewards, old_rewards)
    assert new_stats == old_stats  # loss, approx_kl, clipfrac, grad norm: the same floats
    for a, b in zip(new.parts.model.trainable_parameters(), old.parts.model.trainable_parameters()):
        assert torch.equal(a, b)
    assert new_traj.kept is None  # drop_flat_groups off: everything trains


def test_cfg_off_changes_nothing_for_flux_which_samples_without_true_cfg(compose_cfg, tmp_path) -> None:
    flux = ["model=tiny_flux", f"text_cache_dir={tmp_path / 'cache'}"]
    on = one_epoch(compose_cfg, tmp_path / "on", *flux)
    off = one_epoch(compose_cfg, tmp_path / "off", *flux, "train.cfg=false")
    assert on[1].batches == off[1].batches
    assert torch.equal(on[4], off[4]) and on[5] == off[5]
    for a, b in zip(on[0].parts.model.trainable_parameters(), off[0].parts.model.trainable_parameters()):
        assert torch.equal(a, b)


def test_train_cfg_takes_only_a_boolean(compose_cfg) -> None:
    from pcpo_hydra.config import ConfigError

    with pytest.raises(ConfigError, match=r"^invalid configuration: train.cfg: Value 'maybe' is not a valid bool"):
        validate(compose_cfg("train.cfg=maybe"))
