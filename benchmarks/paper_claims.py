"""Does PCPO reach a reward target in fewer epochs than GRPO? The paper's claims, tested on a CPU.

    python benchmarks/paper_claims.py                    # GRPO vs PCPO, 3 seeds, DDIM and DanceGRPO's SDE
    python benchmarks/paper_claims.py --ablation         # GRPO, + log-hinge, + matching log-ratio, + proportional credit
    python benchmarks/paper_claims.py --settings ddim --arms pcpo,pcpo_variance   # DDIM's credit mode (default: reweight)
    python benchmarks/paper_claims.py --epochs 80 --seeds 5 rollout.prompts_per_epoch=16   # larger
    python benchmarks/paper_claims.py --speed            # time to target: GRPO, PCPO, PCPO on an SDE window (+ CFG-free), 5 seeds

The world is benchmarks/pretrain_world.py's: tiny SD and SD3 base models pretrained on captioned
coloured shapes (this script pretrains them first if their folders are missing), fine-tuned for
JPEG compressibility, DDPO's task, while the evaluation measures what that costs their caption
agreement (see SETTINGS; `reward=world_all` as an override trains for the captions instead).
Positional arguments are Hydra overrides applied to every run, as `pcpo-train` takes them.

Each (setting, arm, seed) is a real training run, trained by pcpo-train's own `build.run` and
logged to MLflow (experiment `pcpo-hydra-paper-claims`, tags setting/arm/seed/benchmark_id).
Besides the loop's own metrics (reward, clip fraction, within-group diversity), every
`--eval-every` epochs the run's own evaluation (`eval=holdout`, docs/evaluation.md) has the policy
sample `--eval-prompts` world prompts held out of training, with fixed noise, whose images give
`eval/drift` (RMS pixel distance to the base model's images for the same prompt and noise),
`eval/reward_mean` and `eval/caption_agreement_mean` (world_all, whichever reward the run trains).

Reported (markdown + PNG plots in --out, also logged as artifacts of a summary run):
- epochs to reach fixed reward targets, as the paper's Table 10, on the evaluation reward: the
  targets are the rewards 50/75/90% of the way from the base model's to the best arm's final one
  (the mean over seeds of its last 3 evaluations), and a run reaches one when the moving average
  of its last 2 evaluations does. (A CPU-sized epoch's rollout reward moves more with which
  prompts were drawn than with the policy; the fixed set moves only with the policy.)
- clip fraction per epoch, within-group diversity, drift and caption agreement, means over
  seeds, and those costs at equal reward: where each run first reaches the 50% target.
- with --speed, time to each target: training seconds (the loop's own rollout, reward and update
  time, evaluations left out) and epochs, as Kaplan-Meier medians over the seeds, so a seed that
  never reaches a target counts as censored at its last epoch instead of being dropped; the
  fraction of seeds reaching it; and each arm's wall-clock speed-up over the first arm (full-SDE
  GRPO) of the same invocation, with a bootstrap interval over seeds.
- with --fidelity, also pcpo-eval's fidelity and diversity at that matched-reward point: FID and
  FD-DINOv2 of the run's evaluation images against its base model's (epoch 0: the same prompts
  and seeds), and the LPIPS diversity within each prompt's images (evaluation.fidelity). The metric
  networks' weights come from --torch-hub and --dinov2 (or are downloaded where their hosts answer).

A finished run is recorded under --out/records/ by its resolved config: asking for it again
(another arm order, --ablation, whose ends are GRPO and PCPO, or a rerun after an interruption)
reuses it instead of training it again; --retrain trains everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pcpo_hydra import build
from pcpo_hydra.algorithms.steps import network_images_per_epoch
from pcpo_hydra.config import validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.evaluation.callback import Evaluation
from pcpo_hydra.images import to_uint8
from pcpo_hydra.tracking import MLflowTracker

# The shapes world is a plugin: an installed copy (pip install ./benchmarks/shapes_world) comes first,
# else the one beside this script (which also puts its conf/ on Hydra's search path).
sys.path.append(str(Path(__file__).resolve().parent / "shapes_world"))

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "pcpo-hydra-paper-claims"
WORLD_MODELS = {"ddim": "sd", "dancegrpo": "sd3"}  # pretraining folder each setting's model loads
# The paper's two sampler families, each on its base model of the world, trained for DDPO's JPEG
# compressibility. Caption agreement (reward=world_all) left neither anything it learns in 30 epochs
# at this size (benchmarks/results/world_models.md): the world SD already draws colour, size and
# shape close to the world's own renders and ignores position, and the world SD3's 3 x 30 runs ended
# where they began (0.836). So the runs compress, and eval/caption_agreement measures what that
# costs the captions.
SETTINGS = {
    "ddim": ["model=world_sd", "sampler=ddim", "prompts=world", "reward=jpeg_compressibility"],
    "dancegrpo": ["model=world_sd3", "sampler=dancegrpo_sde", "prompts=world", "reward=jpeg_compressibility"],
}
ARMS = {
    "grpo": ["algorithm=grpo"],
    "pcpo": ["algorithm=pcpo"],  # proportional credit in the sampler family's default mode
    # the paper's ablation ladder: each rung adds one of PCPO's parts to GRPO
    "+log_hinge": ["algorithm=grpo", "algorithm.objective=log_hinge"],
    "+matching": ["algorithm=grpo", "algorithm.objective=log_hinge", "algorithm.log_ratio=matching"],
    "+proportional": ["algorithm=pcpo"],
    # DDIM's credit mode (docs/design.md, "Credit weights"): proportional credit by changing the stds,
    # or by reweighting
    "pcpo_variance": ["algorithm=pcpo", "algorithm.credit_mode=variance"],
    "pcpo_reweight": ["algorithm=pcpo", "algorithm.credit_mode=reweight"],
    # cheaper epochs (Flow-GRPO-Fast): noise and training on a random window of 3 of the 10 steps
    # each epoch, the ODE elsewhere; and that without classifier-free guidance in rollout and update
    "pcpo_window": ["algorithm=pcpo", "sampler.sde_window.size=3", "sampler.sde_window.placement=random"],
    "pcpo_window_nocfg": ["algorithm=pcpo", "sampler.sde_window.size=3", "sampler.sde_window.placement=random",
                          "train.cfg=false"],
}
ABLATION = ("grpo", "+log_hinge", "+matching", "+proportional")
SPEED = ("grpo", "pcpo", "pcpo_window", "pcpo_window_nocfg")
BOOTSTRAP = 2000     # resamples of the seeds for the speed-up's interval
TARGET_FRACTIONS = (0.5, 0.75, 0.9)
SMOOTHING = 2        # evaluation points in the moving average that must reach a target
FINAL_EVALS = 3      # evaluation points averaged for a run's final reward
FINAL_EPOCHS = 5     # epochs averaged for a run's final rollout reward (printed and tabled beside it)
# The run's evaluation (docs/evaluation.md): held-out world prompts x the rollout group, noise seeded
# alike for every arm and seed, scored by the training reward and by world_all (the caption agreement).
EVALUATION = ["eval=holdout", "eval.seed=2024", "eval.group_size=${rollout.group_size}",
              "+reward@eval.rewards.caption_agreement=world_all"]


@dataclass
class RunRecord:
    """One training run's per-epoch figures."""

    setting: str
    arm: str
    seed: int
    reward: list[float] = field(default_factory=list)
    clipfrac: list[float] = field(default_factory=list)
    diversity: list[float] = field(default_factory=list)
    eval_epochs: list[int] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)
    eval_reward: list[float] = field(default_factory=list)
    caption_agreement: list[float] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds: list[float] = field(default_factory=list)  # the loop's own seconds, cumulative, per epoch
    rollout_seconds: list[float] = field(default_factory=list)  # per epoch
    update_seconds: list[float] = field(default_factory=list)   # per epoch
    network_rows: dict[str, int] = field(default_factory=dict)  # images through the network per epoch, by phase
    images: str = ""  # the file of its evaluation images (images_file), for --fidelity
    eval_group: int = 0  # evaluation images per prompt (consecutive in the images)

    def eval(self, epoch: int, metrics: dict[str, float]) -> None:
        self.eval_epochs.append(epoch)
        self.drift.append(metrics["eval/drift"])
        self.eval_reward.append(metrics["eval/reward_mean"])
        self.caption_agreement.append(metrics["eval/caption_agreement_mean"])


class RecordedEvaluation(Evaluation):
    """The run's own evaluation (conf/eval/holdout.yaml, set by run_overrides), noting what the benchmark reads.

    The record's seconds count from the base model's evaluation to the last epoch: the training
    and its evaluations, not building the model or opening the MLflow store.
    """

    def __init__(self, cfg, record: RunRecord) -> None:
        super().__init__(cfg)
        self.record = record
        self.started = 0.0
        self.epoch = 0
        self.images: dict[int, Any] = {}  # epoch -> the evaluation's 8-bit images, for --fidelity

    def maybe_evaluate(self, trainer, epoch: int) -> dict[str, float]:
        if epoch == 0:
            self.started = time.perf_counter()
        self.epoch = epoch
        metrics = super().maybe_evaluate(trainer, epoch)
        if metrics:
            self.record.eval(epoch, metrics)
        return metrics

    def sample(self, trainer):
        images = super().sample(trainer)
        self.images[self.epoch] = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)  # as a PNG holds them
        return images

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.record.reward.append(metrics["rollout/reward_mean"])
        self.record.clipfrac.append(metrics["train/clipfrac"])
        self.record.diversity.append(metrics["rollout/group_diversity"])
        self.record.train_seconds.append((self.record.train_seconds or [0.0])[-1] + metrics["time/epoch_s"])
        self.record.rollout_seconds.append(metrics["time/rollout_s"])
        self.record.update_seconds.append(metrics["time/update_s"])
        self.record.seconds = time.perf_counter() - self.started


def combine(*layers: list[str]) -> list[str]:
    """Overrides of all layers, a later layer's replacing an earlier one's for the same key (Hydra refuses both)."""
    merged: dict[str, str] = {}
    for layer in layers:
        for override in layer:
            merged[override.split("=", 1)[0]] = override
    return list(merged.values())


def run_overrides(setting: str, arm_overrides: list[str], seed: int, args: argparse.Namespace) -> list[str]:
    run = [f"seed={seed}", f"epochs={args.epochs}", "checkpoint_every=0", "log_images_every=0",
           f"logger.experiment_name={EXPERIMENT}", *EVALUATION, f"eval.every={args.eval_every}",
           f"eval.holdout={args.eval_prompts}"]
    return combine(SETTINGS[setting], arm_overrides, run, args.overrides)


def run_config(setting: str, arm_overrides: list[str], seed: int, args: argparse.Namespace):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return validate(compose("train", run_overrides(setting, arm_overrides, seed, args)))


def group_choices(overrides: list[str]) -> dict[str, str]:
    """The option each config group was composed from, as pcpo-train's Hydra reports them (the run's tags)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        choices = compose("train", overrides, return_hydra_config=True).hydra.runtime.choices
    return {group: str(option) for group, option in choices.items()}


def fingerprint(cfg, args: argparse.Namespace) -> str:
    """What a run's figures depend on: the resolved training config (its evaluation included) and the base model's files.

    Left out: where it logs, and the CPU thread count (which reorders float sums, nothing more).
    A base model pretrained again (same folder, new files) is a new fingerprint.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("logger", None)
    container["hardware"].pop("num_threads", None)
    pretrained = cfg.model.get("pretrained")
    folder = Path(pretrained) if pretrained else None  # a hub id is no folder: its revision is in the config
    if folder is not None and folder.is_dir():
        container["base_model_files"] = sorted(
            (str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*") if f.is_file())
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def images_file(record_file: Path) -> Path:
    """Where a record's evaluation images are kept beside it (epoch -> uint8 [N, 3, H, W])."""
    return record_file.with_name(record_file.stem + "_eval_images.pt")


def cached_record(path: Path, arm: str) -> RunRecord | None:
    """A finished run's record from an earlier invocation, relabelled with this invocation's arm name."""
    if not path.is_file():
        return None
    record = RunRecord(**json.loads(path.read_text()))
    record.arm = arm
    return record


def train(setting: str, arm: str, arm_overrides: list[str], seed: int, args: argparse.Namespace,
          benchmark_id: str) -> RunRecord:
    """One real training run, through `build.run` with the evaluation callback; logged to MLflow.

    A run whose config matches one already finished under the same --out is not trained again
    (unless --retrain): the ablation ladder's ends and the credit-mode comparison reuse the main
    comparison's runs, and an interrupted benchmark resumes at the run it was in.
    """
    cfg = run_config(setting, arm_overrides, seed, args)
    key = fingerprint(cfg, args)
    record_file = Path(args.out) / "records" / f"{setting}_seed{seed}_{key}.json"
    if not args.retrain and (record := cached_record(record_file, arm)) is not None:
        print(f"{setting:9s} {arm:14s} seed {seed}: reused {record_file.name} (same config as its run)", flush=True)
        return record
    run_dir = Path(args.out) / "runs" / f"{setting}_{arm}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # an unrecorded run starts over: its record needs every epoch
    evaluation = RecordedEvaluation(cfg.eval, RunRecord(setting, arm, seed))
    tags = {"benchmark": "paper_claims", "benchmark_id": benchmark_id, "setting": setting, "arm": arm, "seed": str(seed)}
    choices = group_choices(run_overrides(setting, arm_overrides, seed, args))
    build.run(cfg, run_dir, choices, arm_overrides + args.overrides, tags, callbacks=[evaluation])
    record = evaluation.record
    record.images, record.eval_group = str(images_file(record_file)), cfg.eval.group_size
    record.network_rows = network_images_per_epoch(cfg)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(evaluation.images, images_file(record_file))
    record_file.write_text(json.dumps(asdict(record)))
    print(f"{setting:9s} {arm:14s} seed {seed}: eval reward {record.eval_reward[0]:.3f} -> {final_reward(record):.3f}, "
          f"rollout {record.reward[0]:.3f} -> {statistics.fmean(record.reward[-FINAL_EPOCHS:]):.3f} "
          f"in {record.seconds:.0f} s", flush=True)
    return record


# ------------------------------------------------------------------------------------- analysis


def smoothed(values: list[float], window: int = SMOOTHING) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    return [statistics.fmean(values[max(0, k - window + 1) : k + 1]) for k in range(len(values))]


def epochs_to_reach(record: RunRecord, target: float) -> int | None:
    """First epoch whose moving-average evaluation reward is >= target; None if never.

    The evaluation set (fixed prompts and noise) is what makes this a measurement: the rollout
    reward of a CPU-sized epoch moves more with which prompts were drawn than with the policy.
    The base model's point (epoch 0) is left out of the average.
    """
    trained = [(e, v) for e, v in zip(record.eval_epochs, record.eval_reward) if e > 0]
    for (epoch, _), value in zip(trained, smoothed([v for _, v in trained])):
        if value >= target:
            return epoch
    return None


def final_reward(record: RunRecord) -> float:
    return statistics.fmean(record.eval_reward[-FINAL_EVALS:])


def targets(records: list[RunRecord]) -> list[float]:
    """Evaluation rewards TARGET_FRACTIONS of the way from the base model's to the best arm's final one.

    None when no arm ends above the base model: every run would "reach" a target below where it began.
    """
    start = statistics.fmean(r.eval_reward[0] for r in records)
    finals: dict[str, list[float]] = {}
    for r in records:
        finals.setdefault(r.arm, []).append(final_reward(r))
    best = max(statistics.fmean(v) for v in finals.values())
    return [start + q * (best - start) for q in TARGET_FRACTIONS] if best > start else []


def mean_curve(records: list[RunRecord], key: str) -> list[float]:
    curves = [getattr(r, key) for r in records]
    return [statistics.fmean(values) for values in zip(*curves)]


def _mean_sd(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def setting_report(setting: str, records: list[RunRecord], arms: list[str], fidelity: Any = None) -> list[str]:
    """The markdown of one setting: epochs to each target, clip fraction, diversity, drift (and `at_target`'s fidelity)."""
    levels = targets(records)
    seeds = len({r.seed for r in records})
    lines = [f"### {setting} ({seeds} seeds, {len(records[0].reward)} epochs)", ""]
    base_reward = statistics.fmean(r.eval_reward[0] for r in records)
    if not levels:
        lines += [f"No arm's final evaluation reward is above the base model's ({base_reward:.3f}): no targets.", ""]
    base_agreement = statistics.fmean(r.caption_agreement[0] for r in records)
    columns = ["arm", *(f"epochs to {t:.3f} ({int(q * 100)}%)" for t, q in zip(levels, TARGET_FRACTIONS)),
               f"final eval reward (base {base_reward:.3f})", "final rollout reward", "clip fraction",
               "diversity, last", "drift, last", f"caption agreement, last (base {base_agreement:.3f})"]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    reached: dict[str, list[list[int]]] = {}
    for arm in arms:
        runs = [r for r in records if r.arm == arm]
        cells = []
        reached[arm] = []
        for target in levels:
            hits = [e for e in (epochs_to_reach(r, target) for r in runs) if e is not None]
            reached[arm].append(hits)
            cells.append(f"{_mean_sd(hits)} ({len(hits)}/{len(runs)})")
        final = [final_reward(r) for r in runs]
        rollout = [statistics.fmean(r.reward[-FINAL_EPOCHS:]) for r in runs]
        clip = [statistics.fmean(r.clipfrac) for r in runs]
        cells += [_mean_sd(final, 3), _mean_sd(rollout, 3), f"{statistics.fmean(clip):.3f}",
                  f"{statistics.fmean(r.diversity[-1] for r in runs):.3f}", f"{statistics.fmean(r.drift[-1] for r in runs):.3f}",
                  f"{statistics.fmean(r.caption_agreement[-1] for r in runs):.3f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    base, best = arms[0], arms[-1]
    for target, q, base_hits, best_hits in zip(levels, TARGET_FRACTIONS, reached[base], reached[best]):
        if base_hits and best_hits:
            saving = 1 - statistics.fmean(best_hits) / statistics.fmean(base_hits)
            fewer = f"{saving:.0%} fewer" if saving >= 0 else f"{-saving:.0%} more"
            lines.append(f"- {int(q * 100)}% target ({target:.3f}): {best} needs {fewer} epochs than {base} "
                         f"(means over the seeds that reached it: {len(best_hits)} and {len(base_hits)})")
        else:
            lines.append(f"- {int(q * 100)}% target ({target:.3f}): not reached by every arm; no ratio")
    if levels:
        lines.append(f"- at equal reward, where each run first reaches the 50% target ({levels[0]:.3f}): "
                     + "; ".join(at_target(arm, [r for r in records if r.arm == arm], levels[0], fidelity)
                                 for arm in arms))
    lines.append("")
    return lines


def at_target(arm: str, runs: list[RunRecord], target: float, fidelity: Any = None) -> str:
    """Caption agreement, drift and diversity at the epoch each run first reaches `target`, means over runs;
    with `fidelity` (an evaluation.fidelity.FidelityMetrics) also FID, FD-DINOv2 and LPIPS diversity there.

    A faster arm has moved further by any fixed epoch; at equal reward the costs compare like for like.
    """
    points, measured = [], []
    for run in runs:
        epoch = epochs_to_reach(run, target)
        if epoch is not None:
            k = run.eval_epochs.index(epoch)
            points.append((run.caption_agreement[k], run.drift[k], run.diversity[epoch - 1]))
            if fidelity is not None and Path(run.images).is_file():
                measured.append(fidelity_at(run, epoch, fidelity))
    if not points:
        return f"{arm} never"
    agreement, drift, diversity = (statistics.fmean(p[i] for p in points) for i in range(3))
    line = f"{arm} caption agreement {agreement:.3f}, drift {drift:.3f}, diversity {diversity:.3f}"
    if measured:
        fid, fd_dinov2, lpips = (statistics.fmean(m[i] for m in measured) for i in range(3))
        line += f", FID {fid:.3g}, FD-DINOv2 {fd_dinov2:.3g}, LPIPS diversity {lpips:.3f} ({len(measured)} with images)"
    return line + f" ({len(points)}/{len(runs)} runs)"


def fidelity_at(run: RunRecord, epoch: int, fidelity: Any) -> tuple[float, float, float]:
    """(FID, FD-DINOv2) of the run's evaluation images at `epoch` against its base model's (epoch 0: the same
    prompts and seeds), and the mean LPIPS diversity within each prompt's images at `epoch`."""
    from pcpo_hydra.evaluation.fidelity import frechet_distance

    images = torch.load(run.images)  # 8-bit, as FidelityMetrics takes them
    base, now = images[0], images[epoch]
    before, after = (fidelity.features(x, ["fid", "fd_dinov2"]) for x in (base, now))
    lpips = statistics.fmean(fidelity.lpips_diversity(now[k:k + run.eval_group])
                             for k in range(0, len(now), run.eval_group))
    return frechet_distance(before["fid"], after["fid"]), frechet_distance(before["fd_dinov2"], after["fd_dinov2"]), lpips


def time_to(record: RunRecord, target: float) -> tuple[int, float, bool]:
    """(epochs, training seconds, reached): when the run reached `target`, else its last epoch (censored there)."""
    epoch = epochs_to_reach(record, target)
    reached = epoch is not None
    epoch = epoch if reached else len(record.reward)
    return epoch, record.train_seconds[epoch - 1], reached


def median_time(times: list[float], reached: list[bool]) -> tuple[float | None, float]:
    """(Kaplan-Meier median, the longest time observed): the median is None while fewer than half have reached it.

    The product-limit estimate counts a run that never reached the target as one that had not by its
    last epoch, where averaging the runs that did would drop it (statsmodels' SurvfuncRight).
    """
    import numpy as np
    from statsmodels.duration.survfunc import SurvfuncRight

    fit = SurvfuncRight(np.asarray(times, dtype=float), np.asarray(reached, dtype=float))
    median = fit.quantile(0.5)
    return (None if np.isnan(median) else float(median)), max(times)


def _median_cell(times: list[float], reached: list[bool], digits: int) -> str:
    median, longest = median_time(times, reached)
    value = f"{median:.{digits}f}" if median is not None else f"> {longest:.{digits}f}"
    return f"{value} ({sum(reached)}/{len(reached)})"


def speedup(base: list[tuple[int, float, bool]], arm: list[tuple[int, float, bool]]) -> str:
    """The base arm's median training seconds to target over the arm's, with a bootstrap interval over seeds.

    Seeds are resampled in pairs (same seed: same base model, prompts and noise streams). A median
    still censored gives a bound: "> r" when only the base's is, "< r" when only the arm's is.
    """
    import numpy as np

    def ratio(rows: list[int]) -> tuple[float | None, str]:
        b = median_time([base[k][1] for k in rows], [base[k][2] for k in rows])
        a = median_time([arm[k][1] for k in rows], [arm[k][2] for k in rows])
        if b[0] is not None and a[0] is not None:
            return b[0] / a[0], ""
        if a[0] is not None:
            return b[1] / a[0], ">"
        if b[0] is not None:
            return b[0] / a[1], "<"
        return None, ""

    point, bound = ratio(list(range(len(base))))
    if point is None:
        return "neither reaches it in half the seeds"
    rng = np.random.default_rng(0)
    draws = [ratio(list(rng.integers(0, len(base), len(base)))) for _ in range(BOOTSTRAP)]
    values = [r for r, _ in draws if r is not None]
    low, high = np.percentile(values, [2.5, 97.5])
    return f"{bound}{point:.2f}x [{low:.2f}, {high:.2f}]"


def speed_report(setting: str, records: list[RunRecord], arms: list[str], fidelity: Any = None) -> list[str]:
    """Time to each target per arm (Kaplan-Meier medians), cost per epoch, and the speed-up over the first arm."""
    levels = targets(records)
    if not levels:
        return [f"### {setting}: time to target", "", "No arm ends above the base model: no targets.", ""]
    by_arm = {arm: sorted((r for r in records if r.arm == arm), key=lambda r: r.seed) for arm in arms}
    reached = {arm: [[time_to(r, t) for r in runs] for t in levels] for arm, runs in by_arm.items()}
    names = [f"{int(q * 100)}%" for q in TARGET_FRACTIONS[: len(levels)]]
    columns = ["arm", "s/epoch: rollout + update", "network images/epoch: rollout + update",
               *(f"epochs to {n}" for n in names), *(f"seconds to {n}" for n in names),
               f"speed-up to 50% over {arms[0]} (seconds)"]
    lines = [f"### {setting}: time to target ({len(by_arm[arms[0]])} seeds; targets "
             + ", ".join(f"{n} = {t:.3f}" for n, t in zip(names, levels)) + ")", "",
             "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for arm, runs in by_arm.items():
        rollout = statistics.fmean(x for r in runs for x in r.rollout_seconds)
        update = statistics.fmean(x for r in runs for x in r.update_seconds)
        rows = runs[0].network_rows
        cells = [f"{rollout:.2f} + {update:.2f}", f"{rows.get('rollout', 0)} + {rows.get('update', 0)}"]
        cells += [_median_cell([float(e) for e, _, _ in hits], [ok for _, _, ok in hits], 0) for hits in reached[arm]]
        cells += [_median_cell([s for _, s, _ in hits], [ok for _, _, ok in hits], 0) for hits in reached[arm]]
        cells.append("1 (baseline)" if arm == arms[0] else speedup(reached[arms[0]][0], reached[arm][0]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"- at equal reward, where each run first reaches the 50% target ({levels[0]:.3f}): "
              + "; ".join(at_target(arm, runs, levels[0], fidelity) for arm, runs in by_arm.items()), ""]
    return lines


def plot(setting: str, records: list[RunRecord], arms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(14, 7))
    panels = [("eval_reward", "evaluation reward (fixed prompts and noise)"), ("reward", "rollout reward (mean)"),
              ("clipfrac", "clip fraction"), ("diversity", "within-group diversity (RMS px)"),
              ("drift", "drift from base samples (RMS px)"), ("caption_agreement", "caption agreement (world_all)")]
    for axis, (key, title) in zip(axes.flat, panels):
        for arm in arms:
            runs = [r for r in records if r.arm == arm]
            x = runs[0].eval_epochs if key in ("eval_reward", "drift", "caption_agreement") else range(1, len(runs[0].reward) + 1)
            axis.plot(list(x), mean_curve(runs, key), label=arm)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
    for target in targets(records):
        axes.flat[0].axhline(target, color="grey", linewidth=0.5, linestyle=":")
    axes.flat[0].legend()
    figure.suptitle(f"{setting}: means over {len({r.seed for r in records})} seeds (dotted: the 50/75/90% targets)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_seconds(setting: str, records: list[RunRecord], arms: list[str], path: Path) -> None:
    """Evaluation reward against training seconds (means over seeds): what a GPU-hour buys, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        runs = [r for r in records if r.arm == arm]
        seconds = [statistics.fmean(([0.0] + r.train_seconds)[e] for r in runs) for e in runs[0].eval_epochs]
        axis.plot(seconds, mean_curve(runs, "eval_reward"), label=arm, marker=".")
    for target in targets(records):
        axis.axhline(target, color="grey", linewidth=0.5, linestyle=":")
    axis.set_xlabel("training seconds (rollout + reward + update; evaluations left out)")
    axis.set_ylabel("evaluation reward")
    axis.set_title(f"{setting}: means over {len({r.seed for r in records})} seeds (dotted: the 50/75/90% targets)",
                   fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ------------------------------------------------------------------------------------- main


def ensure_world_models(settings: list[str], overrides: list[str]) -> None:
    """Pretrain the world's base models the settings load, unless a model override replaces them."""
    if any(o.startswith(("model=", "model.pretrained=")) for o in overrides):
        return
    missing = [WORLD_MODELS[s] for s in settings if not (ROOT / "outputs" / "world_models" / WORLD_MODELS[s]).is_dir()]
    if missing:
        print(f"pretraining the world's base models first: {missing}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pretrain_world.py")], check=True, cwd=ROOT)


def fidelity_metrics(args: argparse.Namespace) -> Any:
    """pcpo-eval's FID, FD-DINOv2 and LPIPS networks, their weights checked first (one line each, exit 2)."""
    from pcpo_hydra.evaluation.fidelity import FidelityMetrics, weight_problems

    metrics = ["fid", "fd_dinov2", "lpips_diversity"]
    problems = weight_problems(metrics, args.torch_hub, args.dinov2)
    if problems:
        raise SystemExit("paper_claims --fidelity: " + "; ".join(problems))
    return FidelityMetrics.build(metrics, args.torch_hub, args.dinov2)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; 5 with --speed)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run")
    parser.add_argument("--settings", default="ddim,dancegrpo", help=f"comma-separated, of {sorted(SETTINGS)}")
    parser.add_argument("--arms", default="grpo,pcpo", help=f"comma-separated, of {sorted(ARMS)}; the first is the baseline")
    parser.add_argument("--ablation", action="store_true", help="arms " + ",".join(ABLATION) + ": PCPO's parts one at a time")
    parser.add_argument("--speed", action="store_true",
                        help="arms " + ",".join(SPEED) + ", time to target (with --seeds 5 unless given)")
    parser.add_argument("--eval-every", type=int, default=2, help="epochs between evaluation samples")
    parser.add_argument("--eval-prompts", type=int, default=8, help="prompts in the evaluation set (x group_size images)")
    parser.add_argument("--out", default="outputs/benchmarks/paper_claims", help="report, plots and run dirs")
    parser.add_argument("--retrain", action="store_true", help="train every run, even one already finished in --out")
    parser.add_argument("--fidelity", action="store_true", help="FID, FD-DINOv2 and LPIPS diversity at matched reward")
    parser.add_argument("--torch-hub", help="with --fidelity: pcpo-eval's weights.torch_hub (the Inception, AlexNet files)")
    parser.add_argument("--dinov2", default="facebook/dinov2-base", help="with --fidelity: pcpo-eval's weights.dinov2")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, as for pcpo-train")
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    names = ABLATION if args.ablation else SPEED if args.speed else args.arms.split(",")
    args.seeds = args.seeds or (5 if args.speed else 3)
    unknown = [n for n in names if n not in ARMS] + [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown {unknown}; arms: {sorted(ARMS)}, settings: {sorted(SETTINGS)}")
    arms = {name: ARMS[name] for name in names}
    fidelity = fidelity_metrics(args) if args.fidelity else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_world_models(settings, args.overrides)
    benchmark_id = time.strftime("%Y-%m-%d_%H-%M-%S")
    records: list[RunRecord] = []
    for setting in settings:
        for seed in range(args.seeds):
            for arm, arm_overrides in arms.items():
                records.append(train(setting, arm, arm_overrides, seed, args, benchmark_id))
    lines = [f"## {' vs '.join(arms)} on the shapes world", ""]
    for setting in settings:
        mine = [r for r in records if r.setting == setting]
        lines += setting_report(setting, mine, list(arms), fidelity)
        if args.speed:
            lines += speed_report(setting, mine, list(arms), fidelity)
            plot_seconds(setting, mine, list(arms), out / f"{setting}_seconds.png")
        plot(setting, mine, list(arms), out / f"{setting}.png")
    report = "\n".join(lines)
    (out / "report.md").write_text(report + "\n")
    (out / "records.json").write_text(json.dumps([asdict(r) for r in records], indent=1))
    print("\n" + report)
    summary = MLflowTracker(None, EXPERIMENT, f"paper_claims summary {benchmark_id}")
    summary.start(None, {"seeds": str(args.seeds), "epochs": str(args.epochs), "arms": ",".join(arms),
                         "overrides": " ".join(args.overrides) or "(none)"},
                  {"benchmark": "paper_claims", "benchmark_id": benchmark_id})
    plots = [f"{s}.png" for s in settings] + ([f"{s}_seconds.png" for s in settings] if args.speed else [])
    for name in ("report.md", "records.json", *plots):
        summary.log_artifact(out / name, "report")
    summary.end("FINISHED")
    print(f"\nreport, plots and records in {out}; MLflow experiment {EXPERIMENT}")


if __name__ == "__main__":
    main(sys.argv[1:])
