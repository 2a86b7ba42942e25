"""SDE windows: noise and training only inside a window of steps, the ODE elsewhere, on every sampler family."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pcpo_hydra.algorithms import direct_log_ratio, matching_log_ratio
from pcpo_hydra.algorithms.policy_gradient import PolicyGradient
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.models.tiny import build_tiny_sd
from pcpo_hydra.models.tiny_flux import build_tiny_flux
from pcpo_hydra.models.tiny_sd3 import build_tiny_sd3
from pcpo_hydra.rollout import _randn, sample_trajectories
from pcpo_hydra.samplers import build_dancegrpo_sampler, build_ddim_sampler, build_flowgrpo_sampler
from pcpo_hydra.samplers.window import SDEWindow

STEPS, FIRST, SIZE = 6, 2, 3
PROMPTS = ["a cat", "a cat", "a dog", "a dog"]


def window(placement: str, first: int = 0, end: int = 10, size: int = 3, every: int = 1, stride: int = 1,
           seed: int = 0) -> SDEWindow:
    return SDEWindow(size, placement, first, end, every, stride, seed)


# ------------------------------------------------------------------------------ the schedule


def test_a_fixed_window_starts_at_its_range():
    assert [window("fixed", first=4).start(epoch) for epoch in (1, 2, 50)] == [4, 4, 4]


def test_a_sliding_window_moves_by_stride_every_few_epochs_then_starts_over():
    # starts that fit [1, 9) with 3 steps: 1, 3, 5 (stride 2; 7 would end at 10); two epochs each
    slide = window("sliding", first=1, end=9, every=2, stride=2)
    assert [slide.start(epoch) for epoch in range(1, 10)] == [1, 1, 3, 3, 5, 5, 1, 1, 3]


def test_a_random_window_is_drawn_per_epoch_from_the_seed_alone():
    draws = [window("random", first=2, end=8).start(epoch) for epoch in range(1, 401)]
    assert set(draws) == {2, 3, 4, 5}  # every start that fits [2, 8), none that does not
    assert min(Counter(draws).values()) > 60  # about uniform: 100 each expected
    assert draws == [window("random", first=2, end=8).start(epoch) for epoch in range(1, 401)]
    other_seed = [window("random", first=2, end=8, seed=1).start(epoch) for epoch in range(1, 401)]
    assert other_seed != draws


def test_the_config_node_builds_the_window_or_none():
    node = {"num_steps": 10, "sde_window": {"size": 2, "placement": "sliding", "range": None, "every": 3, "stride": 1}}
    assert SDEWindow.from_config(node, seed=7) == SDEWindow(2, "sliding", 0, 10, 3, 1, 7)
    assert SDEWindow.from_config({**node, "sde_window": {**node["sde_window"], "range": [2, 5]}}, 7).end == 5
    assert SDEWindow.from_config({**node, "sde_window": {**node["sde_window"], "size": None}}, 7) is None
    assert SDEWindow.from_config({"num_steps": 10}, 7) is None  # a run saved before windows existed


@pytest.mark.parametrize(("overrides", "problem"), [
    (["sampler.sde_window.size=11"], "sampler.sde_window.size=11: more steps than the 10 of its range [0, 10)"),
    (["sampler.sde_window.size=2", "sampler.sde_window.range=[4,12]"],
     "sampler.sde_window.range=[4, 12]: must be [first, end) with 0 <= first < end <= sampler.num_steps=10"),
    (["sampler.sde_window.size=3", "sampler.sde_window.range=[4,6]"],
     "sampler.sde_window.size=3: more steps than the 2 of its range [4, 6)"),
    (["sampler.sde_window.placement=sliding"],
     "sampler.sde_window.placement='sliding': places no window while sampler.sde_window.size is null"),
    (["sampler.sde_window.placement=middle"], "sampler.sde_window.placement='middle': must be one of 'fixed', "),
    (["sampler.sde_window.size=0"], "sampler.sde_window.size=0: must be a number > 0"),
    (["sampler.sde_window.size=2", "train.timestep_fraction=0.4"],
     "train.timestep_fraction=0.4: trains no step of sampler.sde_window.size=2"),
])
def test_a_bad_window_is_one_line_naming_the_key(compose_cfg, overrides, problem):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(*overrides))
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(problem), info.value.problems


def test_a_sampler_node_without_a_window_is_refused_by_name_and_null_means_no_window(compose_cfg):
    """conf/ is the one place the default lives; a run saved before windows existed gets it on resume."""
    from omegaconf import open_dict

    cfg = compose_cfg()
    with open_dict(cfg):
        del cfg.sampler["sde_window"]
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert "sampler.sde_window: is missing; set it to a node with keys size, placement, range, every, stride or null" \
        in str(refused.value)
    with open_dict(cfg):
        cfg.sampler["sde_window"] = None
    assert SDEWindow.from_config(validate(cfg).sampler, cfg.seed) is None


def test_the_update_is_sized_by_the_window(compose_cfg):
    from pcpo_hydra.build import accumulation_steps

    full = validate(compose_cfg("train.steps_per_forward=1"))
    windowed = validate(compose_cfg("train.steps_per_forward=1", "sampler.sde_window.size=4"))
    assert accumulation_steps(full) == accumulation_steps(windowed) * 10 // 4


# ------------------------------------------------------------------------------ rollouts on every family


def families():
    """(name, model, full-SDE sampler) of each sampler family on its tiny model."""
    ddim_model = build_tiny_sd(seed=0, resolution=16)
    sd3 = build_tiny_sd3(seed=0, resolution=16)
    flux = build_tiny_flux(seed=0, resolution=16)
    return [
        ("ddim", ddim_model, build_ddim_sampler(ddim_model, STEPS, 1.0)),
        ("dancegrpo_sde", flux, build_dancegrpo_sampler(flux, STEPS, 0.3)),
        ("flowgrpo_sde", sd3, build_flowgrpo_sampler(sd3, STEPS, 0.7)),
    ]


FAMILIES = families()


@pytest.fixture(scope="module", params=FAMILIES, ids=[name for name, _, _ in FAMILIES])
def rolled_out(request):
    """(model, full sampler, windowed sampler, trajectories rolled out with the window)."""
    _, model, full = request.param
    windowed = full.windowed(FIRST, SIZE)
    traj = sample_trajectories(model, windowed, PROMPTS, 4, [torch.Generator().manual_seed(3)])
    return model, full, windowed, traj


def test_only_the_window_is_stored(rolled_out):
    model, _, windowed, traj = rolled_out
    assert traj.first_step == FIRST and list(windowed.noisy_steps()) == [2, 3, 4]
    assert traj.log_probs.shape == (4, SIZE) and traj.outputs.shape[:2] == traj.noise.shape[:2] == (4, SIZE)
    assert traj.latents.shape[:2] == (4, SIZE + 1)


def test_outside_the_window_the_steps_are_the_ode_and_inside_the_full_sdes_gaussians(rolled_out):
    """The trajectory by hand: deterministic steps (std 0) around the window, the full sampler's steps in it."""
    model, full, _, traj = rolled_out
    ode = full.deterministic()
    generator = torch.Generator().manual_seed(3)
    x = _randn((4, *model.latent_shape), generator)
    with torch.no_grad():
        for i in range(STEPS):
            f = model.predict(x, full.timestep(i), traj.cond).float()
            z = _randn(tuple(x.shape), generator)
            if i == FIRST:
                assert torch.equal(x, traj.latents[:, 0])
            if FIRST <= i < FIRST + SIZE:
                k = i - FIRST
                x_next = full.step(i, x, f, z)[0]
                assert torch.equal(z, traj.noise[:, k]) and torch.equal(f, traj.outputs[:, k])
                assert torch.equal(x_next, traj.latents[:, k + 1])
                assert torch.equal(full.log_prob(i, x, f, x_next), traj.log_probs[:, k])
            else:
                x_next, mean, std = ode.step(i, x, f, z)
                assert torch.equal(x_next, mean) and float(std) == 0.0
            x = x_next
        assert torch.allclose(model.decode(x), traj.images)


def test_the_window_steps_log_ratio_is_exact(rolled_out):
    """Recomputed at unchanged weights the log-ratio is 0; with a changed output both routes agree (float64)."""
    model, _, windowed, traj = rolled_out
    for k in range(SIZE):
        i = FIRST + k
        x = traj.latents[:, k]
        with torch.no_grad():
            f_new = model.predict(x, windowed.timestep(i), traj.cond).float()
        assert torch.equal(f_new, traj.outputs[:, k])
        log_rho = direct_log_ratio(windowed.log_prob(i, x, f_new, traj.latents[:, k + 1]), traj.log_probs[:, k])
        assert torch.equal(log_rho, torch.zeros(4))
        # in float64 from the stored x, f and z (the step itself was checked above), so rounding stays out
        x64, f_old64, z64 = (t.double() for t in (x, traj.outputs[:, k], traj.noise[:, k]))
        prev64 = windowed.step(i, x64, f_old64, z64)[0]
        f_moved = f_old64 + 0.05 * torch.randn(f_old64.shape, generator=torch.Generator().manual_seed(k),
                                              dtype=torch.float64)
        direct = direct_log_ratio(windowed.log_prob(i, x64, f_moved, prev64), windowed.log_prob(i, x64, f_old64, prev64))
        _, b, s = windowed.coefficients_for(i, x64)
        matching = matching_log_ratio(b, s, z64, f_moved, f_old64)
        assert torch.allclose(direct, matching, rtol=1e-9, atol=1e-12)
        assert direct.abs().min() > 1e-6  # a real change, not two zeros


def test_steps_outside_the_window_have_no_density(rolled_out):
    _, _, windowed, traj = rolled_out
    with pytest.raises(ValueError, match=r"std 0 \(outside the SDE window \[2, 3, 4\]\)"):
        windowed.log_prob(1, traj.latents[:, 0], traj.outputs[:, 0], traj.latents[:, 1])


@pytest.mark.parametrize(("name", "model", "full"), FAMILIES, ids=[name for name, _, _ in FAMILIES])
def test_a_window_step_gets_the_credit_it_has_in_the_full_trajectory(name, model, full):
    """PCPO's effective weight of a window step is c * its interval with the whole trajectory's c, whatever the window.

    Normalising over each window instead would tie the step size to where the window fell: on DDIM
    the last steps' native weights are ~100x the first ones', and a 2-seed pilot of that variant
    on the shapes world trained one seed backwards.
    """
    policy = PolicyGradient("log_hinge", "matching", "proportional", None, 0.1, 5.0)
    assert policy.prepare(full) is full  # reweight mode: the sampler as configured
    c = full.native_weights().mean() / full.intervals().mean()
    for first in range(STEPS - SIZE + 1):
        windowed = full.windowed(first, SIZE)
        for i in windowed.noisy_steps():  # the update's scale of step i (the same table) and the step's own weight
            _, b, s = windowed.coefficients(i)
            assert torch.equal(s, full.coefficients(i)[2])
            effective = policy.scales[i] * b.abs() / s**2
            assert float(effective) == pytest.approx(float(c * full.interval(i)), rel=1e-12)


def test_a_window_of_a_variance_mode_sampler_keeps_its_stds_inside_and_the_ode_outside():
    _, _, full = FAMILIES[0]
    policy = PolicyGradient("log_hinge", "matching", "proportional", "variance", 0.1, 5.0)
    moved = policy.prepare(full)
    window = moved.windowed(FIRST, SIZE).stds()
    assert torch.equal(window[FIRST : FIRST + SIZE], moved.stds()[FIRST : FIRST + SIZE])
    assert not torch.equal(window[FIRST : FIRST + SIZE], full.stds()[FIRST : FIRST + SIZE])
    assert window[:FIRST].abs().max() == 0 and window[FIRST + SIZE :].abs().max() == 0


def test_a_window_that_does_not_fit_is_refused():
    _, _, full = FAMILIES[0]
    with pytest.raises(ValueError, match="an SDE window of 3 steps from step 4 does not fit in 6 steps"):
        full.windowed(4, 3)


# ------------------------------------------------------------------------------ an epoch of the trainer


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sd3"])
def test_an_epoch_trains_the_window_steps_alone_with_one_forward_per_stored_step(compose_cfg, tmp_path, model):
    from pcpo_hydra.build import build_trainer

    overrides = ["experiment=debug", f"model={model}", "sampler.num_steps=6", "rollout.group_size=2",
                 "rollout.batch_size=4", "train.batch_size=2", "train.steps_per_forward=1", "hardware.num_threads=1",
                 "checkpoint_every=0", "log_images_every=0", f"text_cache_dir={tmp_path / 'cache'}",
                 "sampler.sde_window.size=2", "sampler.sde_window.placement=sliding", "sampler.sde_window.stride=2",
                 "sampler.sde_window.range=[1,6]"]
    trainer = build_trainer(validate(compose_cfg(*overrides)), tmp_path, track=False)
    policy = trainer.parts.algorithm.policy
    trained: list[int] = []
    step_loss = policy.step_loss
    policy.step_loss = lambda i, *rest, **kw: (trained.extend(i.tolist()), step_loss(i, *rest, **kw))[1]
    for epoch, first in ((1, 1), (2, 3), (3, 1)):  # starts 1, 3 fit [1, 6) with 2 steps and stride 2; then over
        trained.clear()
        traj, _, stats = trainer.run_epoch(epoch)
        assert traj.first_step == first and traj.log_probs.shape[1] == 2
        samples = len(traj)
        assert Counter(trained) == {first: samples, first + 1: samples}  # every sample, each window step once
        assert stats["train/num_updates"] == trainer.cfg.train.num_updates
        assert trainer.epoch_metrics(traj, traj.rewards, stats)["rollout/sde_window_start"] == first
