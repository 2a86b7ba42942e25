"""benchmarks/epoch_cost.py stays runnable and reports each phase of every setting against the first."""

from __future__ import annotations

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def epoch_cost():
    yield from benchmark_module("epoch_cost")


def test_every_setting_is_timed_by_phase_and_counted_in_network_images(epoch_cost) -> None:
    settings = list(epoch_cost.SETTINGS)
    medians = epoch_cost.measure(["experiment=debug", "sampler.num_steps=4", "hardware.num_threads=1"], settings, 2)
    assert list(medians) == settings
    for m in medians.values():
        assert all(m[phase] > 0 for phase in epoch_cost.PHASES)
    # experiment=debug: 2 prompts x 2 images, 4 steps, guidance 5 (doubled batches), all steps trained
    assert (medians["full"]["rollout_images"], medians["full"]["update_images"]) == (32, 32)
    assert (medians["nocfg"]["rollout_images"], medians["nocfg"]["update_images"]) == (16, 16)
    assert (medians["window"]["rollout_images"], medians["window"]["update_images"]) == (32, 24)  # 3 of 4 steps
    assert (medians["window_nocfg"]["rollout_images"], medians["window_nocfg"]["update_images"]) == (16, 12)
    lines = epoch_cost.report(medians, 2)
    assert lines[2].startswith("| setting | rollout s | update s | epoch s |")
    assert [line.split("|")[1].strip() for line in lines[4:]] == settings
    assert lines[4].endswith("| 32 | 32 | 1.000 |")
