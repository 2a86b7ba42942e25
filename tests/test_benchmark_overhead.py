"""benchmarks/overhead.py stays runnable and its network clock measures a part of the epoch."""

from __future__ import annotations


import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def overhead():
    yield from benchmark_module("overhead")


def test_network_clock_counts_every_forward_and_backward_inside_the_epoch(overhead, capsys):
    trainer = overhead.build_trainer(["experiment=debug", "hardware.num_threads=1"], "pcpo")
    arm = overhead.Arm("pcpo", trainer, overhead.NetworkClock(trainer), [])
    calls = []
    trainer.parts.model.network.register_forward_hook(lambda *_: calls.append(1))
    overhead.measure(arm)
    epoch = arm.epochs[0]
    overhead.measure(arm)  # the report's quartiles need two epochs
    # Per epoch of the debug preset: 4 images sampled in one batch over 4 steps (4 forwards), then
    # 2 micro-batches whose 4 steps go into one forward each (the tiny recipe's steps_per_forward).
    assert len(calls) == 2 * (4 + 2)
    assert 0.0 < epoch["network"] < epoch["epoch"]
    assert epoch["epoch"] == pytest.approx(epoch["rollout"] + epoch["reward"] + epoch["update"], rel=0.05)
    overhead.report({"grpo": arm, "pcpo": arm}, "cpu", 1)
    assert "PCPO / GRPO epoch time: 1.000" in capsys.readouterr().out
