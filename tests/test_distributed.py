"""Distributed training: hardware presets, the launch entry, ZeRO-2 over gloo, failing ranks, preemption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.distributed import LaunchError, batch_seed, deepspeed_config, launch, world_size

TINY = [  # tests/test_training.py's tiny run; the equivalence below needs num_updates=1 (see there)
    "experiment=debug", "sampler.num_steps=3", "rollout.group_size=4", "rollout.batch_size=4",
    "train.batch_size=4", "log_images_every=0",
]


# ------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("preset", "world", "stage"),
    [("cpu", 1, None), ("cpu2_zero2", 2, 2), ("gpu1", 1, None), ("node8_zero2", 8, 2), ("node8_zero3", 8, 3),
     ("multinode", 16, 2)],
)
def test_hardware_presets_validate_and_set_world_size_and_zero_stage(compose_cfg, preset, world, stage) -> None:
    cfg = validate(compose_cfg(f"hardware={preset}"))
    assert world_size(cfg.hardware) == world
    assert cfg.hardware.slurm.tasks_per_node * cfg.hardware.slurm.nodes == world
    assert (cfg.hardware.deepspeed.stage if cfg.hardware.deepspeed else None) == stage


def test_deepspeed_config_carries_stage_offload_precision_buckets_and_clipping(compose_cfg) -> None:
    cfg = validate(compose_cfg("hardware=node8_zero3", "hardware.deepspeed.offload_optimizer=true",
                               "hardware.deepspeed.offload_params=true", "train.max_grad_norm=0.5"))
    ds = deepspeed_config(cfg.hardware, cfg.train, accumulation_steps=6)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["reduce_bucket_size"] == 500_000_000
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_accumulation_steps"] == 6 and ds["gradient_clipping"] == 0.5
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.batch_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["hardware=cpu2_zero2", "hardware.deepspeed.offload_params=true"], "hardware.deepspeed.offload_params=True: needs"),
     (["hardware=cpu2_zero2", "hardware.slurm.tasks_per_node=3"], "hardware.slurm.tasks_per_node=3: must equal"),
     (["hardware=node8_zero2", "hardware.slurm.gpus_per_node=4"], "hardware.slurm.gpus_per_node=4: fewer GPUs"),
     (["hardware.backend=mpi"], "hardware.backend='mpi': must be one of")],
)
def test_inconsistent_hardware_is_refused_naming_the_key(compose_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(*overrides))


def test_launch_refuses_a_world_that_differs_from_the_hardware(compose_cfg, monkeypatch) -> None:
    hardware = validate(compose_cfg("hardware=cpu2_zero2")).hardware
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LaunchError, match="started 3 processes but hardware asks for 2"):
        launch(lambda: 0.0, hardware)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(LaunchError, match="hardware.nodes=2: several nodes need a launcher"):
        launch(lambda: 0.0, validate(compose_cfg("hardware=multinode")).hardware)


def test_rollout_noise_depends_on_the_global_batch_not_on_the_rank() -> None:
    """Rank r's batch j of an epoch is global batch r * batches_per_rank + j: same seed as one process's."""
    seeds = {(epoch, batch): batch_seed(0, epoch, batch) for epoch in (1, 2) for batch in range(4)}
    assert len(set(seeds.values())) == len(seeds)  # no two batches share noise
    assert batch_seed(0, 1, 3) == seeds[(1, 3)] and batch_seed(1, 1, 3) != seeds[(1, 3)]


# ------------------------------------------------------------------------------------- real runs


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def pcpo_train(tmp: Path, *overrides: str, env: dict[str, str] | None = None, wait: bool = True,
               launcher: list[str] | None = None):
    """`pcpo-train` (the module, under `launcher` if given) with a private MLflow store in `tmp`.

    Returns the finished process, or the running one when not `wait`.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", **(env or {})}
    command = [*(launcher or [sys.executable]), "-m", "pcpo_hydra.train", *TINY, *overrides]
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_weights" / "diffusion_pytorch_model.safetensors")


def reward_history(store: Path) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "rollout/reward_mean")}


def initial_weights(compose_cfg) -> dict[str, torch.Tensor]:
    """The tiny UNet as both runs start from (built in code from the same seed)."""
    from pcpo_hydra.build import build

    return build(compose_cfg(*TINY).model).network.state_dict()


# One process with 4 prompts, or two ZeRO-2 ranks with 2 each: the same epoch, split differently.
ONE_AND_ZERO2 = {"one": ["hardware=cpu", "hardware.num_threads=1", "rollout.prompts_per_epoch=4"],
                 "zero2": ["hardware=cpu2_zero2", "rollout.prompts_per_epoch=2"]}


def weight_updates(compose_cfg, tmp_path: Path, runs: dict[str, list[str]], common: list[str],
                   env: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Train each run (the ZeRO-3 one under torchrun); its final weights minus the initial ones, flattened."""
    for name, overrides in runs.items():
        (tmp_path / name).mkdir()
        result = pcpo_train(tmp_path / name, *common, *overrides, f"hydra.run.dir={tmp_path / name}/run",
                            env=env, launcher=TORCHRUN if name == "zero3" else None)
        assert result.returncode == 0, result.stderr[-4000:]
    initial = initial_weights(compose_cfg)
    return {name: torch.cat([(final_weights(tmp_path / name / "run")[k] - initial[k]).flatten() for k in initial])
            for name in runs}


def relative_difference(moved: torch.Tensor, reference: torch.Tensor) -> float:
    return ((moved - reference).norm() / reference.norm()).item()


def run_metrics(store: Path) -> dict[str, float]:
    """The last value of every metric of the store's one run."""
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    return run.data.metrics


@pytest.mark.integration
def test_zero2_and_zero3_on_two_ranks_match_one_process_with_twice_the_batch(compose_cfg, tmp_path: Path) -> None:
    """Two updates: 2 ranks x 2 prompts under ZeRO-2 and ZeRO-3 reach the weights of 1 process x 4 prompts.

    Both updates train on the epoch's one rollout (inner_epochs=2, one update each), so the runs
    step on the same samples; the order inside an update only changes float summation. Adam's
    eps is set far above the gradients, which makes AdamW a plain gradient step: a wrong gradient
    scale (a sum over ranks instead of a mean, a wrong accumulation count) would then show, where
    Adam's usual sign-like first steps would hide it. ZeRO-3's final weights are gathered from shards;
    its ranks are started by torchrun, whose environment the launch entry uses as it is.
    """
    common = ["epochs=1", "train.inner_epochs=2", "train.num_updates=1", "train.timestep_fraction=1.0",
              "checkpoint_every=0", "optim.lr=1e-2", "optim.eps=1.0", "train.max_grad_norm=1e9"]
    zero3 = ["hardware=cpu2_zero2", "hardware.deepspeed.stage=3", "rollout.prompts_per_epoch=2"]
    moved = weight_updates(compose_cfg, tmp_path, {**ONE_AND_ZERO2, "zero3": zero3}, common)
    assert moved["one"].abs().max() > 1e-3  # the weights did train
    for sharded in ("zero2", "zero3"):
        assert reward_history(tmp_path / sharded / "mlflow.db") == pytest.approx(
            reward_history(tmp_path / "one" / "mlflow.db"), rel=1e-6)
        relative = relative_difference(moved[sharded], moved["one"])
        print(f"{sharded} x 2 vs 1 process: relative difference of the updates {relative:.2e}")
        assert relative < 1e-4  # measured ~1e-5 (float summation order); a 2x gradient scale error gives 0.5


@pytest.mark.integration
def test_sdpo_on_two_zero2_ranks_matches_one_process_slot_by_slot(compose_cfg, tmp_path: Path) -> None:
    """SDPO steps the optimizer once per step slot: 3 slots x 2 inner epochs, the same 6 steps on both layouts.

    DeepSpeed accumulates over the count `build.accumulation_steps` gives it; were SDPO's (one slot's
    micro-batches) wrong, its engine would step at other boundaries than the loop's and the weights
    would part. Every pair trains step j in slot j (shuffle_timestep=false), so both layouts take
    the same gradient at each step; AdamW with a large eps is a plain gradient step, as above.
    """
    common = ["algorithm=sdpo", "algorithm.shuffle_timestep=false", "epochs=1", "train.inner_epochs=2",
              "train.num_updates=1", "train.steps_per_forward=1", "checkpoint_every=0", "optim.lr=1e-2",
              "optim.eps=1.0", "train.max_grad_norm=1e9"]
    moved = weight_updates(compose_cfg, tmp_path, ONE_AND_ZERO2, common)
    assert moved["one"].abs().max() > 1e-4
    assert relative_difference(moved["zero2"], moved["one"]) < 1e-4
    for name in ONE_AND_ZERO2:  # 3 slots x 2 inner epochs, on every rank
        assert run_metrics(tmp_path / name / "mlflow.db")["train/num_updates"] == 6


FAIL_ON_RANK_1 = '''
import os
import pcpo_hydra.loop as loop

working_update = loop.Trainer.update

def update_failing_on_rank_1(self, *args, **kwargs):
    if os.environ.get("RANK") == "1":  # set in the rank after start-up, so looked up at call time
        raise RuntimeError("injected failure on rank 1")
    return working_update(self, *args, **kwargs)

loop.Trainer.update = update_failing_on_rank_1
'''


@pytest.mark.integration
def test_a_failing_rank_fails_the_job_with_its_error_instead_of_hanging(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(FAIL_ON_RANK_1)  # runs at start-up in every spawned rank
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    start = time.monotonic()
    result = pcpo_train(tmp_path, "hardware=cpu2_zero2", "rollout.prompts_per_epoch=2", "epochs=3",
                        f"hydra.run.dir={tmp_path}/run", env={"PYTHONPATH": pythonpath})
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert time.monotonic() - start < 240  # far below the 30-minute collective timeout: rank 0 did not wait it out


def wait_for_line(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


@pytest.mark.integration
def test_sigterm_checkpoints_two_zero2_ranks_and_resume_continues_the_same_run(tmp_path: Path) -> None:
    """SIGTERM mid-run: both ranks stop after the epoch with a ZeRO checkpoint; resume logs each epoch once."""
    common = ["hardware=cpu2_zero2", "rollout.prompts_per_epoch=2", "epochs=8", "checkpoint_every=0"]
    straight = tmp_path / "straight"
    straight.mkdir()
    assert pcpo_train(straight, *common, f"hydra.run.dir={straight}/run").returncode == 0
    reference = reward_history(straight / "mlflow.db")

    run_dir = tmp_path / "run"
    process = pcpo_train(tmp_path, *common, f"hydra.run.dir={run_dir}", wait=False)
    wait_for_line(run_dir / "train.log", "epoch 2/8", timeout=300)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    (checkpoint,) = (run_dir / "checkpoints").glob("epoch_*")
    stopped_at = int(checkpoint.name.split("_")[1])
    assert 2 <= stopped_at < 8 and (checkpoint / "pytorch_model").is_dir()  # DeepSpeed's sharded states
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    assert run.info.status == "KILLED"

    result = pcpo_train(tmp_path, *common, f"resume={run_dir}")
    assert result.returncode == 0, result.stderr[-4000:]
    history = client.get_metric_history(run.info.run_id, "rollout/reward_mean")
    assert sorted(m.step for m in history) == list(range(1, 9))  # every epoch exactly once
    for metric in history:  # weights, optimizer shards and streams continued exactly
        assert metric.value == pytest.approx(reference[metric.step], rel=1e-5), metric.step
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


# ------------------------------------------------------------------------------------- NaN losses


@pytest.mark.integration
def test_nan_losses_skip_their_micro_batch_then_stop_the_run_with_the_checkpoint_intact(compose_cfg, tmp_path) -> None:
    from pcpo_hydra.build import build_trainer
    from pcpo_hydra.checkpoint import latest_checkpoint, load_checkpoint
    from pcpo_hydra.update import NonFiniteLoss

    cfg = validate(compose_cfg(*TINY, "rollout.prompts_per_epoch=2", "train.max_nan_steps=2", "hardware.num_threads=1"))
    trainer = build_trainer(cfg, tmp_path, track=False)
    policy = trainer.parts.algorithm.policy
    real_step_loss = policy.step_loss
    calls = {"n": 0, "poisoned": set()}

    def sometimes_nan(*args, **kwargs):
        loss, stats = real_step_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] in calls["poisoned"] else (loss, stats)

    policy.step_loss = sometimes_nan
    calls["poisoned"] = {2}
    _, _, stats = trainer.run_epoch(1)
    assert stats["train/nan_steps"] == 1.0 and torch.isfinite(torch.tensor(stats["train/loss"]))
    assert all(torch.isfinite(p).all() for p in trainer.parts.model.trainable_parameters())
    trainer.epoch = 1
    trainer.save(1)
    saved = [p.detach().clone() for p in trainer.parts.model.trainable_parameters()]

    calls["poisoned"] = set(range(calls["n"] + 1, calls["n"] + 100))  # every later micro-batch
    with pytest.raises(NonFiniteLoss, match="2 micro-batches in a row"):
        trainer.run_epoch(2)
    assert all(torch.isfinite(p).all() for p in trainer.parts.model.trainable_parameters())
    load_checkpoint(latest_checkpoint(tmp_path), trainer.accelerator)
    for before, after in zip(saved, trainer.parts.model.trainable_parameters()):
        assert torch.equal(before, after)


FLAT_SECOND_HALF = '''
import os
from pcpo_hydra.rewards.jpeg import JpegCompressibility

scored = JpegCompressibility.score_parts

def flat_second_half(self, images, prompts):
    """Equal rewards for the epoch's second half: all of rank 1's groups under 2 ranks, none of rank 0's."""
    rewards, parts = scored(self, images, prompts)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    first_flat = len(rewards) // 2 if world == 1 else (len(rewards) if rank == 0 else 0)
    rewards[first_flat:] = -1.0
    return rewards, parts

JpegCompressibility.score_parts = flat_second_half
'''


@pytest.mark.integration
def test_dropping_every_group_of_one_zero2_rank_trains_as_one_process_does(compose_cfg, tmp_path: Path) -> None:
    """Rank 1 keeps no sample and pads its micro-batches; the ranks stay in step and reach one process's weights.

    As in the ZeRO test above, AdamW with a large eps is a plain gradient step, so the update must be
    the mean over the kept samples on both layouts, and a padding micro-batch must add nothing.
    """
    common = ["epochs=1", "train.inner_epochs=2", "train.num_updates=1", "checkpoint_every=0", "optim.lr=1e-2",
              "optim.eps=1.0", "train.max_grad_norm=1e9", "rollout.drop_flat_groups=true"]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FLAT_SECOND_HALF)
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    moved = weight_updates(compose_cfg, tmp_path, ONE_AND_ZERO2, common, env={"PYTHONPATH": pythonpath})
    assert moved["one"].abs().max() > 1e-3
    relative = relative_difference(moved["zero2"], moved["one"])
    assert relative < 1e-4, relative
    for name in ONE_AND_ZERO2:
        metrics = run_metrics(tmp_path / name / "mlflow.db")
        assert metrics["rollout/flat_groups"] == 2  # of 4
        assert metrics["train/num_updates"] == 2  # one per inner epoch, on every rank
