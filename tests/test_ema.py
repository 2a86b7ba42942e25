"""`train.ema`: the average's maths, the swap, what runs evaluate and save with it, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from safetensors.torch import load_file
from test_training import TINY, only_run, pcpo_train

from pcpo_hydra.checkpoint import TRAINED_WEIGHTS, TRAINER_STATE, WEIGHTS
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.ema import AveragingOptimizer, WeightAverage
from pcpo_hydra.models.trainable import FULL_WEIGHTS

# ------------------------------------------------------------------------------ the average


def weights_at(step: int) -> list[torch.nn.Parameter]:
    """Two parameters holding `step` everywhere: the weights after optimizer step `step`, made easy to average by hand."""
    return [torch.nn.Parameter(torch.full((3,), float(step))), torch.nn.Parameter(torch.full((2, 2), float(step)))]


def stepped(params: list[torch.nn.Parameter], average: WeightAverage, steps: range) -> None:
    """Set the weights to each step's value, as an optimizer step would, and tell the average."""
    for step in steps:
        with torch.no_grad():
            for p in params:
                p.fill_(float(step))
        average.optimizer_stepped()


# Updates at the optimizer steps every, 2 every, ...; the k-th uses d_1 = 0, d_k = min(decay, k / (k + 9)).
@pytest.mark.parametrize(("decay", "every", "steps", "expected"), [
    # steps 1, 2, 3: s = 1; s = 2/11 * 1 + 9/11 * 2 = 20/11; s = 3/12 * 20/11 + 9/12 * 3 = 119/44
    (0.9, 1, 3, 119 / 44),
    # updates at steps 2, 4, 6 of 7: s = 2; s = 2/11 * 2 + 9/11 * 4 = 40/11; d_3 = min(0.2, 3/12) = 0.2:
    # s = 0.2 * 40/11 + 0.8 * 6 = 304/55; step 7 is no update
    (0.2, 2, 7, 304 / 55),
    # every 3 over 2 steps: no update yet, the average is still the starting weights (0)
    (0.9, 3, 2, 0.0),
])
def test_the_average_follows_the_decay_schedule_worked_by_hand(decay, every, steps, expected) -> None:
    params = weights_at(0)
    average = WeightAverage(params, decay, every)
    stepped(params, average, range(1, steps + 1))
    assert average.steps == steps and average.average.optimization_step == steps // every
    for shadow in average.shadow:
        assert shadow.dtype == torch.float32 and shadow.device == params[0].device
        torch.testing.assert_close(shadow, torch.full_like(shadow, expected), rtol=1e-6, atol=0)


def test_swapped_in_puts_the_average_in_and_the_trained_weights_back_bit_for_bit() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    average = WeightAverage(params, 0.9, 1)
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 1e-3)  # steps small against the weights: rounding would show
        average.optimizer_stepped()
    trained = [p.detach().clone() for p in params]
    with average.swapped_in():
        for p, shadow, raw in zip(params, average.shadow, trained):
            assert torch.equal(p, shadow) and not torch.equal(p, raw)
    assert all(torch.equal(p, raw) for p, raw in zip(params, trained))
    with pytest.raises(RuntimeError, match="inside"), average.swapped_in():
        raise RuntimeError("inside")
    assert all(torch.equal(p, raw) for p, raw in zip(params, trained))  # restored on the way out of an error too


def test_a_saved_and_loaded_average_goes_on_as_the_one_never_saved(tmp_path: Path) -> None:
    params, copy = weights_at(0), weights_at(0)
    straight, resumed = WeightAverage(params, 0.5, 2), WeightAverage(copy, 0.5, 2)
    stepped(params, straight, range(1, 4))
    torch.save(straight.state_dict(), tmp_path / "ema.pt")
    stepped(params, straight, range(4, 9))
    stepped(copy, resumed, range(1, 2))  # a different history, overwritten by the load
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", map_location="cpu", weights_only=False))
    stepped(copy, resumed, range(4, 9))
    assert resumed.steps == straight.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(resumed.shadow, straight.shadow))


def test_the_optimizer_feeds_the_average_only_on_steps_that_move_the_weights() -> None:
    """Accelerate's step is a no-op until the gradients are synced: an algorithm may call it every micro-batch."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    layer = torch.nn.Linear(2, 1)
    network, optimizer = accelerator.prepare(layer, torch.optim.SGD(layer.parameters(), lr=0.1))
    average = WeightAverage(list(layer.parameters()), 0.9, 1)
    stepping = AveragingOptimizer(optimizer, average, accelerator)
    for _ in range(6):  # 6 micro-batches, 3 optimizer steps
        with accelerator.accumulate(network):
            accelerator.backward(network(torch.ones(1, 2)).sum())
            stepping.step()
            stepping.zero_grad()  # reaches the wrapped optimizer
    assert average.steps == 3
    assert stepping.param_groups[0]["lr"] == 0.1
    trained = [p.detach() for p in layer.parameters()]
    # after 3 updates the average lags the weights, which moved at each step
    assert all(not torch.equal(s, p) for s, p in zip(average.shadow, trained))


# ------------------------------------------------------------------------------ config


def test_ema_is_off_by_default_and_every_defaults_to_each_step(compose_cfg) -> None:
    ema = validate(compose_cfg()).train.ema
    assert ema.decay is None and ema.every == 1


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.ema.decay=1.0"], "train.ema.decay=1.0: must be a number in (0.0, 1.0)"),
    (["train.ema.decay=0"], "train.ema.decay=0.0: must be a number in (0.0, 1.0)"),
    (["train.ema.decay=0.9", "train.ema.every=0"], "train.ema.every=0: must be a number > 0"),
    (["train.ema.decay=0.9", "hardware=cpu2_zero2", "hardware.deepspeed.stage=3"],
     "train.ema.decay=0.9: needs every trained weight whole on each rank, which hardware.deepspeed.stage=3 "
     "shards; use ZeRO stage 2 (hardware=node8_zero2) or train.ema.decay=null"),
])
def test_a_bad_ema_setting_is_one_line_naming_the_key(compose_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg(*overrides))
    assert error.value.problems == [message]


# ------------------------------------------------------------------------------ runs

RUN = ["epochs=3", "checkpoint_every=1", "keep_checkpoints=5", "log_images_every=0",
       "eval=holdout", "eval.holdout=2", "eval.group_size=2", "eval.every=1"]


def history(store: Path, key: str) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def composed(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return validate(compose(config_name="train", overrides=[*TINY, *overrides]))


@pytest.fixture(scope="module")
def names() -> list[str]:
    """The tiny UNet's trained weights by name, in the order of `model.trainable_parameters()` (and of the shadow)."""
    from pcpo_hydra.build import build

    network = build(composed().model).network
    return [name for name, p in network.named_parameters() if p.requires_grad]


def saved(folder: Path, names: list[str]) -> list[torch.Tensor]:
    """A full fine-tune's saved weights, in the order of `names`."""
    state = load_file(folder / FULL_WEIGHTS)
    assert sorted(state) == sorted(names)
    return [state[name] for name in names]


def shadow_of(checkpoint: Path) -> list[torch.Tensor]:
    return torch.load(checkpoint / TRAINER_STATE, weights_only=False)["ema"]["average"]["shadow_params"]


@pytest.fixture(scope="module")
def with_and_without(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, list]]:
    """The same 3-epoch run with train.ema.decay=0.5 and without: {name: (run dir, store, weights seen by each evaluation)}.

    Each evaluation's network weights are recorded as sampling starts (in-process, through the
    callback's sample_images).
    """
    from pcpo_hydra.build import run
    from pcpo_hydra.evaluation import callback

    root = tmp_path_factory.mktemp("ema_runs")
    real = callback.sample_images
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, ema in (("plain", []), ("ema", ["train.ema.decay=0.5"])):
            seen: list[list[torch.Tensor]] = []

            def recording(model, *args, seen=seen, **kwargs):
                seen.append([p.detach().clone() for p in model.trainable_parameters()])
                return real(model, *args, **kwargs)

            patch.setattr(callback, "sample_images", recording)
            patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / name}.db")
            cfg = composed(*RUN, *ema, f"text_cache_dir={root / 'cache'}")
            run(cfg, root / name, {}, [], {})
            runs[name] = (root / name, root / f"{name}.db", seen)
    return runs


@pytest.mark.integration
def test_training_with_ema_steps_the_same_weights_and_logs_the_same_rollouts(with_and_without, names) -> None:
    """The average never leaks into training: the raw weights and every rollout reward are the run without EMA's."""
    (plain, plain_store, _), (ema, ema_store, _) = with_and_without["plain"], with_and_without["ema"]
    assert history(ema_store, "rollout/reward_mean") == history(plain_store, "rollout/reward_mean")
    for epoch in (1, 2, 3):
        checkpoint = f"checkpoints/epoch_{epoch:05d}"
        assert all(torch.equal(a, b) for a, b in zip(saved(ema / checkpoint / TRAINED_WEIGHTS, names),
                                                     saved(plain / checkpoint / WEIGHTS, names)))
    # without EMA the checkpoint is as it always was
    assert not (plain / "checkpoints/epoch_00003" / TRAINED_WEIGHTS).exists()
    assert "ema" not in torch.load(plain / "checkpoints/epoch_00003" / TRAINER_STATE, weights_only=False)


@pytest.mark.integration
def test_checkpoints_and_final_weights_hold_the_average_and_differ_from_the_trained_weights(with_and_without, names) -> None:
    ema = with_and_without["ema"][0]
    for epoch in (1, 2, 3):
        checkpoint = ema / f"checkpoints/epoch_{epoch:05d}"
        shadow = shadow_of(checkpoint)
        averaged, trained = saved(checkpoint / WEIGHTS, names), saved(checkpoint / TRAINED_WEIGHTS, names)
        assert all(torch.equal(a, s) for a, s in zip(averaged, shadow))
        assert any(not torch.equal(a, t) for a, t in zip(averaged, trained))
    assert all(torch.equal(a, b) for a, b in zip(saved(ema / "final_weights", names), averaged))
    state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)["ema"]
    assert state["steps"] == 6 and state["average"]["optimization_step"] == 6  # 2 optimizer steps an epoch


@pytest.mark.integration
def test_evaluation_samples_the_averaged_weights(with_and_without, names) -> None:
    (plain, plain_store, plain_seen), (ema, ema_store, ema_seen) = with_and_without["plain"], with_and_without["ema"]
    assert len(ema_seen) == len(plain_seen) == 4  # epochs 0 to 3
    assert all(torch.equal(a, b) for a, b in zip(ema_seen[0], plain_seen[0]))  # untrained: the average is the start
    for epoch in (1, 2, 3):
        checkpoint = f"checkpoints/epoch_{epoch:05d}"
        assert all(torch.equal(a, s) for a, s in zip(ema_seen[epoch], shadow_of(ema / checkpoint)))
        assert all(torch.equal(a, t) for a, t in zip(plain_seen[epoch], saved(plain / checkpoint / WEIGHTS, names)))
    # the same training, evaluated through another set of weights: the logged evaluations differ after epoch 0
    plain_drift, ema_drift = history(plain_store, "eval/drift"), history(ema_store, "eval/drift")
    assert plain_drift[0] == ema_drift[0] == 0.0
    assert all(plain_drift[epoch] != ema_drift[epoch] for epoch in (1, 2, 3))
    recorded = [json.loads(line) for line in (ema / "eval_history.jsonl").read_text().splitlines()]
    assert [r["eval/drift"] for r in recorded] == [ema_drift[epoch] for epoch in range(4)]


@pytest.mark.integration
def test_under_lora_the_average_covers_the_adapters_and_the_checkpoint_holds_both_sets(tmp_path: Path) -> None:
    from pcpo_hydra.build import build_trainer

    trainer = build_trainer(composed("model.lora.enabled=true", "train.ema.decay=0.5", "checkpoint_every=1",
                                     f"text_cache_dir={tmp_path / 'cache'}"), tmp_path, track=False)
    model, average = trainer.parts.model, trainer.parts.average
    params = model.trainable_parameters()
    assert params and all("lora" in name for name, p in model.network.named_parameters() if p.requires_grad)
    assert average.params == params
    trainer.fit()
    trained = [p.detach().clone() for p in params]
    checkpoint = tmp_path / "checkpoints" / "epoch_00001"
    model.load_trainable(checkpoint / WEIGHTS)
    assert all(torch.equal(p, s) for p, s in zip(params, average.shadow))
    assert any(not torch.equal(p, t) for p, t in zip(params, trained))
    model.load_trainable(checkpoint / TRAINED_WEIGHTS)
    assert all(torch.equal(p, t) for p, t in zip(params, trained))


@pytest.mark.integration
def test_a_resumed_run_with_ema_logs_and_saves_what_an_uninterrupted_one_does(tmp_path: Path, names) -> None:
    """Stopped after 3 epochs (checkpoint at 2), resumed to 5: rollouts, EMA evaluations and final average equal."""
    common = ["checkpoint_every=2", "keep_checkpoints=5", "log_images_every=0", "train.ema.decay=0.7",
              "train.ema.every=3", "eval=holdout", "eval.holdout=2", "eval.group_size=2", "eval.every=1"]
    pcpo_train(tmp_path / "straight.db", *common, "epochs=5", f"hydra.run.dir={tmp_path / 'straight'}")
    run_dir = tmp_path / "resumed"
    pcpo_train(tmp_path / "resumed.db", *common, "epochs=3", f"hydra.run.dir={run_dir}")
    result = pcpo_train(tmp_path / "resumed.db", f"resume={run_dir}", "epochs=5")
    assert "epoch 3/5" in result.stdout  # epoch 3 recomputed from the epoch-2 checkpoint
    for key in ("rollout/reward_mean", "eval/reward_mean", "eval/drift"):
        resumed, straight = history(tmp_path / "resumed.db", key), history(tmp_path / "straight.db", key)
        assert sorted(resumed) == sorted(straight)
        for epoch, value in straight.items():
            assert resumed[epoch] == pytest.approx(value, rel=1e-6), (key, epoch)
    straight = saved(tmp_path / "straight" / "final_weights", names)
    assert all(torch.equal(a, b) for a, b in zip(saved(run_dir / "final_weights", names), straight))


@pytest.mark.integration
def test_two_zero2_ranks_keep_the_average_of_one_process_with_twice_the_batch(compose_cfg, tmp_path: Path) -> None:
    """Each ZeRO-2 rank holds the whole weights after a step, so each keeps the same average as one process would.

    test_distributed's equivalence (2 ranks x 2 prompts against 1 process x 4; AdamW made a plain
    gradient step), with the EMA on: the average is fed by the engine's steps, which happen inside
    `backward` under DeepSpeed.
    """
    from test_distributed import final_weights, initial_weights, pcpo_train as launch

    common = ["epochs=1", "train.inner_epochs=2", "train.num_updates=1", "checkpoint_every=0", "optim.lr=1e-2",
              "optim.eps=1.0", "train.max_grad_norm=1e9", "train.ema.decay=0.5"]
    runs = {"one": ["hardware=cpu", "hardware.num_threads=1", "rollout.prompts_per_epoch=4"],
            "zero2": ["hardware=cpu2_zero2", "rollout.prompts_per_epoch=2"]}
    for name, overrides in runs.items():
        (tmp_path / name).mkdir()
        result = launch(tmp_path / name, *common, *overrides, f"hydra.run.dir={tmp_path / name}/run")
        assert result.returncode == 0, result.stderr[-4000:]
    initial = initial_weights(compose_cfg)
    moved = {name: torch.cat([(final_weights(tmp_path / name / "run")[k] - initial[k]).flatten() for k in initial])
             for name in runs}
    assert moved["one"].abs().max() > 1e-3  # the average moved: two steps, the second weighted 9/11
    relative = ((moved["zero2"] - moved["one"]).norm() / moved["one"].norm()).item()
    assert relative < 1e-4  # as test_distributed's raw weights: float summation order only
