"""benchmarks/train_cfg.py stays runnable and reports each phase for both settings."""

from __future__ import annotations

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def train_cfg():
    yield from benchmark_module("train_cfg")


def test_both_settings_are_timed_by_phase_and_reported_as_a_ratio(train_cfg, capsys) -> None:
    medians = train_cfg.measure(["experiment=debug", "hardware.num_threads=1"], epochs=2)
    assert set(medians) == {True, False}
    for phases in medians.values():
        assert set(phases) == set(train_cfg.PHASES) and all(seconds > 0 for seconds in phases.values())
    train_cfg.report(medians, 2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["phase", "cfg=true", "cfg=false", "false/true"]
    assert [line.split()[0] for line in lines[2:]] == list(train_cfg.PHASES)
