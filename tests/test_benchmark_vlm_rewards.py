"""benchmarks/vlm_rewards.py stays runnable: both rewards timed in process, the server with and without batching."""

from __future__ import annotations

import pytest

from conftest import benchmark_module

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vlm_rewards():
    yield from benchmark_module("vlm_rewards")


def test_both_rewards_and_both_server_settings_are_timed(vlm_rewards, capsys) -> None:
    figures = vlm_rewards.main(["--images", "4", "--side", "32", "--batch-size", "2", "--max-new-tokens", "2",
                                "--clients", "2", "--per-client", "2", "--repeats", "1"])
    assert sorted(figures["in_process"]) == ["vlm_bertscore", "vlm_judge"]
    assert sorted(figures["server"]) == ["batched", "one_request_per_call"]
    assert all(seconds > 0 for part in figures.values() for seconds in part.values())
    printed = capsys.readouterr().out
    assert "s per 4 images in process" in printed and "x from batching" in printed
