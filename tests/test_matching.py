"""Matched-reward checkpoints: nearest, below and above a target, on run dirs laid out as training writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pcpo_hydra.checkpoint import MANIFEST, TRAINER_STATE, WEIGHTS, intact_checkpoint
from pcpo_hydra.evaluation.matching import (
    EVAL_HISTORY, Match, MatchError, checkpoints_by_epoch, eval_history, match_reward)

# epoch -> eval/reward_mean of a run evaluated every 10 epochs (binary fractions: ties are exact)
REWARDS = {0: -1.0, 10: -0.5, 20: -0.25, 30: 0.125, 40: 0.125, 50: 0.5}


def write_history(run_dir: Path, rewards: dict[int, float], extra_lines: tuple[str, ...] = ()) -> None:
    """eval_history.jsonl as the evaluation callback appends it: one JSON line per evaluation."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"epoch": epoch, "eval/reward_mean": reward, "eval/reward_std": 0.1, "eval/drift": 0.0})
             for epoch, reward in rewards.items()]
    (run_dir / EVAL_HISTORY).write_text("\n".join([*lines, *extra_lines]) + "\n")


def write_checkpoint(run_dir: Path, epoch: int) -> Path:
    """A checkpoint folder with small real files and the manifest save_checkpoint writes (file -> size, itself left out)."""
    checkpoint = run_dir / "checkpoints" / f"epoch_{epoch:05d}"
    (checkpoint / WEIGHTS).mkdir(parents=True)
    (checkpoint / WEIGHTS / "adapter_model.safetensors").write_bytes(bytes(range(200)))
    (checkpoint / "optimizer.bin").write_bytes(b"\x01" * 300)
    (checkpoint / TRAINER_STATE).write_bytes(b"\x02" * 50)
    sizes = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*")) if f.is_file()}
    (checkpoint / MANIFEST).write_text(json.dumps(sizes, indent=1))
    return checkpoint


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run evaluated at every epoch of REWARDS, with an intact checkpoint at each but epoch 0."""
    run = tmp_path / "run"
    write_history(run, REWARDS)
    for epoch in REWARDS:
        if epoch:
            write_checkpoint(run, epoch)
    return run


def test_nearest_below_and_above_bracket_the_target(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    assert match_reward(run_dir, -0.3) == Match(run_dir, 20, -0.25, checkpoints / "epoch_00020" / WEIGHTS, "nearest")
    assert match_reward(run_dir, -0.3, pick="below") == Match(
        run_dir, 10, -0.5, checkpoints / "epoch_00010" / WEIGHTS, "below")
    assert match_reward(run_dir, -0.3, pick="above").epoch == 20
    assert match_reward(run_dir, -0.25, pick="below").epoch == 20 == match_reward(run_dir, -0.25, pick="above").epoch


def test_epoch_0_is_the_base_model_with_no_weights(run_dir: Path) -> None:
    assert match_reward(run_dir, -5.0) == Match(run_dir, 0, -1.0, None, "nearest")


def test_ties_go_to_the_earlier_epoch(run_dir: Path) -> None:
    assert match_reward(run_dir, 0.125).epoch == 30  # epochs 30 and 40 both reached 0.125
    assert match_reward(run_dir, 0.0, pick="above").epoch == 30
    assert match_reward(run_dir, 0.25, pick="below").epoch == 30
    assert match_reward(run_dir, -0.375).epoch == 10  # -0.5 and -0.25 are equally far from -0.375


def test_an_epoch_evaluated_twice_keeps_its_last_line(run_dir: Path) -> None:
    """A resumed run evaluates again the epoch it resumed at; a line cut short by a crash is passed over."""
    repeated = json.dumps({"epoch": 20, "eval/reward_mean": 0.375})
    write_history(run_dir, REWARDS, (repeated, '{"epoch": 60, "eval/rew'))
    assert eval_history(run_dir)[20] == 0.375 and 60 not in eval_history(run_dir)
    assert match_reward(run_dir, 0.375).epoch == 20


def test_another_key_and_lines_without_it(run_dir: Path) -> None:
    write_history(run_dir, REWARDS, (json.dumps({"epoch": 30, "eval/hps_mean": 0.27}),
                                     json.dumps({"epoch": 40, "eval/hps_mean": math.nan})))
    assert eval_history(run_dir, "eval/hps_mean") == {30: 0.27}
    assert match_reward(run_dir, 0.0, key="eval/hps_mean").epoch == 30


def test_a_damaged_checkpoint_is_passed_over(run_dir: Path) -> None:
    weights = run_dir / "checkpoints" / "epoch_00020" / WEIGHTS / "adapter_model.safetensors"
    weights.write_bytes(b"truncated")
    assert 20 not in checkpoints_by_epoch(run_dir) and 10 in checkpoints_by_epoch(run_dir)
    assert match_reward(run_dir, -0.25).epoch == 10  # of those left, -0.5 is the nearest


def test_checkpoints_by_epoch_and_intact_checkpoint_read_the_same_folders(run_dir: Path) -> None:
    """A checkpoint from before manifests counts by its trainer state; a partial write or a stray folder does not."""
    old = run_dir / "checkpoints" / "epoch_00005"
    old.mkdir()
    (old / TRAINER_STATE).write_bytes(b"state")
    (run_dir / "checkpoints" / ".partial_epoch_00060").mkdir()
    (run_dir / "checkpoints" / "epoch_00070").mkdir()  # no manifest, no trainer state: not a checkpoint
    assert list(checkpoints_by_epoch(run_dir)) == [5, 10, 20, 30, 40, 50]
    (run_dir / "checkpoints" / "epoch_00050" / "optimizer.bin").unlink()
    assert intact_checkpoint(run_dir) == (run_dir / "checkpoints" / "epoch_00040",
                                          [f"{run_dir / 'checkpoints' / 'epoch_00050' / 'optimizer.bin'} is missing"])


def test_no_history_says_to_train_with_evaluation(tmp_path: Path) -> None:
    with pytest.raises(MatchError, match=r"run: no eval_history\.jsonl \(train with eval=holdout") as error:
        match_reward(tmp_path / "run", 0.0)
    assert str(tmp_path / "run") in str(error.value) and "\n" not in str(error.value)


def test_no_checkpoint_at_an_evaluated_epoch_says_how_to_keep_them(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_history(run, REWARDS)
    write_checkpoint(run, 15)  # checkpoint_every not a multiple of eval.every
    with pytest.raises(MatchError) as error:
        match_reward(run, 0.0)
    assert str(error.value) == (
        f"{run}: no intact checkpoint at any evaluated epoch (evaluated: 0, 10, 20, 30, 40, 50; intact "
        f"checkpoints: 15); set checkpoint_every to a multiple of eval.every and keep_checkpoints high enough")


@pytest.mark.parametrize(("pick", "target", "sign"), [("below", -1.5, "<="), ("above", 0.75, ">=")])
def test_no_checkpoint_on_the_asked_side_names_the_range_found(run_dir: Path, pick: str, target: float, sign: str) -> None:
    with pytest.raises(MatchError) as error:
        match_reward(run_dir, target, pick=pick)
    assert str(error.value) == (f"{run_dir}: no checkpoint with eval/reward_mean {sign} {target:g} "
                                f"(the rewards found run from -1 to 0.5)")


def test_a_key_no_line_has_is_named(run_dir: Path) -> None:
    with pytest.raises(MatchError, match=r"has no finite 'eval/hps_mean'"):
        match_reward(run_dir, 0.0, key="eval/hps_mean")


def test_an_unknown_pick_is_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="pick='closest': one of nearest, below, above"):
        match_reward(run_dir, 0.0, pick="closest")


def test_checkpoints_without_a_weights_folder_are_not_candidates(run_dir: Path) -> None:
    """A DeepSpeed run's checkpoints hold the engine's shards only: the one without weights/ is passed over."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "epoch_00020" / WEIGHTS)
    (run_dir / "checkpoints" / "epoch_00020" / MANIFEST).write_text(json.dumps({TRAINER_STATE: 50, "optimizer.bin": 300}))
    assert match_reward(run_dir, -0.25).epoch == 10  # -0.5 at epoch 10 and 0.125 at 30 are both 0.25 away: the earlier
    for epoch in (10, 30, 40, 50):
        shutil.rmtree(run_dir / "checkpoints" / f"epoch_{epoch:05d}" / WEIGHTS)
        (run_dir / "checkpoints" / f"epoch_{epoch:05d}" / MANIFEST).write_text(
            json.dumps({TRAINER_STATE: 50, "optimizer.bin": 300}))
    with pytest.raises(MatchError, match=r"its checkpoints hold no weights/ folder .*sample its final_weights instead"):
        match_reward(run_dir, -0.25)
