"""Schemas of every config node. A group's node is checked against the schema its `_target_` names.

Only plain dataclasses here (no torch), so validation runs before any model is built. No field
has a default (every one is MISSING, `???`): the YAML under conf/ is the one place a default is
written, and a node that leaves a key out is refused naming the key. `_target_` is no default but
the schema's identity: the key GROUP_SCHEMAS finds it by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import Constraint, at_least, checked, interval, one_of, positive
from pcpo_hydra.config.needs import Executable, PythonModule, RewardServer
from pcpo_hydra.prompts import prompt_file_problem
from pcpo_hydra.world import grammar as world

# ---------------------------------------------------------------------------------------- model


@dataclass
class LoraSchema:
    """`model.lora`: LoRA adapters on a frozen base; also the settings models.trainable attaches them by."""

    enabled: bool = MISSING
    rank: int = checked(positive())
    alpha: float = checked(positive())
    target_modules: list[str] = MISSING


@dataclass
class PretrainedSchema:
    """Weights from a hub id or a local folder (models and rewards alike)."""

    pretrained: str = MISSING
    revision: Optional[str] = MISSING


@dataclass
class PolicySchema:
    """What every model node takes: guidance, what trains, and whether text encoders leave the device."""

    guidance_scale: float = checked(at_least(1.0))
    offload_text_encoders: bool = MISSING  # embed all prompts once (text cache), then unload the encoders
    lora: LoraSchema = MISSING


@dataclass
class PretrainedPolicySchema(PretrainedSchema, PolicySchema):
    resolution: int = checked(positive())
    gradient_checkpointing: bool = MISSING


@dataclass
class TinyPolicySchema(PolicySchema):
    seed: int = MISSING  # torch.manual_seed takes any int (the run's seed, bounded below, is what numpy sees)
    resolution: int = checked(positive())


@dataclass
class StableDiffusionSchema(PretrainedPolicySchema):
    FAMILY: ClassVar[str] = "diffusion"  # what the network predicts; a sampler must be of the same family
    _target_: str = "pcpo_hydra.models.stable_diffusion.load_stable_diffusion"


@dataclass
class TinyStableDiffusionSchema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "diffusion"
    _target_: str = "pcpo_hydra.models.tiny.build_tiny_sd"


@dataclass
class SD3Schema(PretrainedPolicySchema):
    FAMILY: ClassVar[str] = "flow"  # velocity prediction
    _target_: str = "pcpo_hydra.models.sd3.load_sd3"
    max_sequence_length: int = checked(positive())  # T5 tokens


@dataclass
class TinySD3Schema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.tiny_sd3.build_tiny_sd3"


@dataclass
class FluxSchema(PretrainedPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.flux.load_flux"
    guidance: float = checked(at_least(0.0))  # the distilled guidance FLUX.1-dev embeds
    max_sequence_length: int = checked(positive())  # T5 tokens


@dataclass
class TinyFluxSchema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.tiny_flux.build_tiny_flux"
    guidance: float = checked(at_least(0.0))


# -------------------------------------------------------------------------------------- sampler


@dataclass
class DDIMSamplerSchema:
    FAMILY: ClassVar[str] = "diffusion"  # the model family it steps (epsilon prediction)
    _target_: str = "pcpo_hydra.samplers.build_ddim_sampler"
    num_steps: int = checked(positive())
    eta: float = checked(interval(0.0, 1.0, low_open=True))


@dataclass
class DanceGRPOSamplerSchema:
    FAMILY: ClassVar[str] = "flow"  # velocity prediction
    _target_: str = "pcpo_hydra.samplers.build_dancegrpo_sampler"
    num_steps: int = checked(positive())
    eta: float = checked(positive())
    shift: Optional[float] = checked(positive())  # None: the model's own schedule


@dataclass
class FlowGRPOSamplerSchema:
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.samplers.build_flowgrpo_sampler"
    num_steps: int = checked(positive())
    noise_level: float = checked(positive())


# --------------------------------------------------------------------------------------- reward


@dataclass
class JpegRewardSchema:
    _target_: str = MISSING
    batch_size: int = checked(positive())
    quality: int = checked(interval(1, 100))


@dataclass
class RewardModelSchema:
    """What every reward with a network takes: how many images a call scores, where and in what dtype."""

    batch_size: int = checked(positive())
    device: str = MISSING
    dtype: str = checked(one_of("float32", "float16", "bfloat16"))


@dataclass
class ClipScoreSchema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.clip_score.ClipScore"
    scale: float = checked(positive())


@dataclass
class AestheticSchema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.aesthetic.AestheticScore"
    head: str = MISSING


@dataclass
class PickScoreSchema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.pickscore.PickScore"
    processor: Optional[str] = MISSING  # null: the tokenizer and image processor come from `pretrained`


@dataclass
class HPSv2Schema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.hpsv2.HPSv2Score"
    checkpoint: str = MISSING


@dataclass
class ImageRewardSchema(RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.imagereward.ImageReward"
    checkpoint: str = MISSING
    med_config: str = MISSING
    tokenizer: str = MISSING


@dataclass
class OcrSchema:
    NEEDS: ClassVar[tuple] = (  # what the machine must have (checked before anything heavy, see config.needs)
        PythonModule("pytesseract", "pip install 'pcpo-hydra[ocr]'"),
        Executable("tesseract_cmd", "tesseract", "apt-get install tesseract-ocr tesseract-ocr-eng "
                   "(conda: conda install -c conda-forge tesseract; macOS: brew install tesseract)"),
    )
    _target_: str = "pcpo_hydra.rewards.ocr.OcrReward"
    batch_size: int = checked(positive())
    lang: str = MISSING
    psm: int = checked(one_of(1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))
    thresholding: str = checked(one_of("otsu", "leptonica_otsu", "sauvola"))
    min_side: int = checked(at_least(0))
    workers: int = checked(positive())
    tesseract_cmd: Optional[str] = MISSING


@dataclass
class MultiRewardSchema:
    """Each component is a whole reward node, checked against its own schema (see NESTED)."""

    NESTED: ClassVar[dict[str, str]] = {"components": "reward"}  # field -> group its values belong to
    _target_: str = "pcpo_hydra.rewards.multi.MultiReward"
    components: Dict[str, Any] = MISSING
    weights: Dict[str, float] = MISSING

    def relations(self, prefix: str) -> Iterator[str]:
        """Every component needs a weight and every weight a component."""
        if set(self.weights) != set(self.components):
            yield (f"{prefix}.weights={dict(self.weights)}: must name exactly the components "
                   f"{sorted(self.components)} of {prefix}.components")


@dataclass
class RemoteRewardSchema:
    """A reward served by pcpo-reward-server (conf/reward_server.yaml)."""

    NEEDS: ClassVar[tuple] = (RewardServer("url", "health_wait_s"),)
    _target_: str = "pcpo_hydra.rewards.remote.RemoteReward"
    url: str = checked(Constraint(
        lambda v: v.startswith(("http://", "https://")), "an http:// or https:// URL"))
    timeout_s: float = checked(positive())
    retries: int = checked(at_least(0))
    backoff_s: float = checked(at_least(0.0))
    batch_size: int = checked(positive())
    health_wait_s: Optional[float] = checked(at_least(0.0))  # null: the server is not asked before use


# Shapes world (pcpo_hydra.world, conf/reward/world_*.yaml): every world reward takes only a batch size.


@dataclass
class WorldRewardSchema:
    _target_: str = MISSING
    batch_size: int = checked(positive())


# ------------------------------------------------------------------------------------ algorithm


@dataclass
class AlgorithmSchema:
    _target_: str = "pcpo_hydra.algorithms.build.build_algorithm"
    objective: str = checked(one_of("ratio", "log_hinge"))
    log_ratio: str = checked(one_of("direct", "matching"))
    credit: str = checked(one_of("native", "proportional"))
    credit_mode: Optional[str] = checked(one_of("variance", "reweight"))
    clip_range: float = checked(positive())
    adv_clip_max: float = checked(positive())
    kl_beta: float = checked(at_least(0.0))
    advantage: str = checked(one_of("group", "per_prompt"))
    stat_buffer_size: int = checked(positive())
    stat_min_count: int = checked(positive())


# ------------------------------------------------------------------------- hardware, prompts, logger


@dataclass
class DeepSpeedSchema:
    """ZeRO through Accelerate's DeepSpeed plugin; `null` in place of this node trains without DeepSpeed."""

    stage: int = checked(one_of(0, 1, 2, 3))
    offload_optimizer: bool = MISSING  # optimizer states (and the step) in CPU memory
    offload_params: bool = MISSING     # parameters in CPU memory between uses (stage 3 only)
    overlap_comm: bool = MISSING       # overlap gradient reduction with the backward pass
    contiguous_gradients: bool = MISSING
    reduce_bucket_size: int = checked(positive())     # elements per gradient reduction
    allgather_bucket_size: int = checked(positive())  # elements per parameter all-gather

    def relations(self, prefix: str) -> Iterator[str]:
        if self.offload_params and self.stage != 3:
            yield f"{prefix}.offload_params=True: needs {prefix}.stage=3 (got {self.stage})"


@dataclass
class SlurmResourcesSchema:
    """What hydra/launcher=slurm (and =local) asks for; conf/hydra/launcher/*.yaml read these."""

    nodes: int = checked(positive())
    tasks_per_node: int = checked(positive())   # one training process per task
    gpus_per_node: int = checked(at_least(0))
    cpus_per_task: int = checked(positive())
    mem_gb: int = checked(at_least(0))         # 0: all of the node's memory
    timeout_min: int = checked(positive())
    partition: Optional[str] = MISSING
    account: Optional[str] = MISSING
    qos: Optional[str] = MISSING
    signal_delay_s: int = checked(positive())  # SIGUSR1 this long before the time limit


@dataclass
class HardwareSchema:
    device: str = checked(one_of("cpu", "cuda"))
    mixed_precision: str = checked(one_of("no", "fp16", "bf16"))
    num_threads: Optional[int] = checked(positive())
    nodes: int = checked(positive())
    processes_per_node: int = checked(positive())  # one per GPU; world size = nodes x this
    backend: Optional[str] = checked(one_of("gloo", "nccl"))  # null: nccl on cuda, gloo on cpu
    collective_timeout_min: int = checked(positive())  # a rank waiting longer on the others fails
    deepspeed: Optional[DeepSpeedSchema] = MISSING
    slurm: SlurmResourcesSchema = MISSING

    def relations(self, prefix: str) -> Iterator[str]:
        """The launcher's task layout must be the training world's."""
        for ours, theirs in (("nodes", "nodes"), ("processes_per_node", "tasks_per_node")):
            if getattr(self, ours) != getattr(self.slurm, theirs):
                yield (f"{prefix}.slurm.{theirs}={getattr(self.slurm, theirs)}: must equal "
                       f"{prefix}.{ours}={getattr(self, ours)} (one task per training process)")
        if self.device == "cuda" and self.slurm.gpus_per_node and self.slurm.gpus_per_node < self.processes_per_node:
            yield (f"{prefix}.slurm.gpus_per_node={self.slurm.gpus_per_node}: fewer GPUs than "
                   f"{prefix}.processes_per_node={self.processes_per_node}")


@dataclass
class SimpleAnimalsSchema:
    _target_: str = "pcpo_hydra.prompts.simple_animals"


@dataclass
class ActivitiesSchema:
    _target_: str = "pcpo_hydra.prompts.activities"
    activities: list[str] = MISSING


@dataclass
class PromptListSchema:
    _target_: str = "pcpo_hydra.prompts.from_list"
    name: str = MISSING
    prompts: list[str] = MISSING


@dataclass
class PromptFileSchema:
    _target_: str = "pcpo_hydra.prompts.from_file"
    path: str = MISSING

    def relations(self, prefix: str) -> Iterator[str]:
        """The file must give prompts: found now, not after the model is built."""
        problem = prompt_file_problem(self.path)
        if problem:
            yield f"{prefix}.path={self.path!r}: {problem}"


# Shapes world (conf/prompts/world.yaml): the captions of every combination of the words given.


def _words_of(vocabulary: tuple[str, ...]) -> Constraint:
    return Constraint(lambda v: 0 < len(v) and set(v) <= set(vocabulary), "a non-empty list of " + ", ".join(vocabulary))


@dataclass
class WorldPromptsSchema:
    _target_: str = "pcpo_hydra.world.grammar.world_prompts"
    colours: list[str] = checked(_words_of(tuple(world.COLOURS)))
    shapes: list[str] = checked(_words_of(world.SHAPES))
    sizes: list[str] = checked(_words_of(tuple(world.SIZES)))
    positions: list[str] = checked(_words_of(tuple(world.POSITIONS)))


@dataclass
class MLflowSchema:
    _target_: str = "pcpo_hydra.tracking.MLflowTracker"
    tracking_uri: Optional[str] = MISSING
    experiment_name: str = MISSING
    run_name: Optional[str] = MISSING


# ---------------------------------------------------------------------------------- top level


@dataclass
class RolloutSchema:
    prompts_per_epoch: int = checked(positive())
    group_size: int = checked(at_least(2))
    batch_size: int = checked(positive())


@dataclass
class TrainSchema:
    batch_size: int = checked(positive())
    inner_epochs: int = checked(positive())
    timestep_fraction: float = checked(interval(0.0, 1.0, low_open=True))
    num_updates: int = checked(positive())
    steps_per_forward: int = checked(positive())
    max_grad_norm: float = checked(positive())
    max_nan_steps: int = checked(positive())  # micro-batches in a row with a non-finite loss before the run stops


@dataclass
class OptimSchema:
    lr: float = checked(positive())
    weight_decay: float = checked(at_least(0.0))
    betas: list[float] = MISSING
    eps: float = checked(positive())


@dataclass
class RunSchema:
    """Top-level keys; the groups are checked by their own schemas (GROUP_SCHEMAS)."""

    seed: int = checked(interval(0, 2**32 - 1))  # numpy's seeding takes no negative, nothing from 2**32
    epochs: int = checked(positive())
    resume: Optional[str] = MISSING
    run_name: Optional[str] = MISSING
    checkpoint_every: int = checked(at_least(0))
    keep_checkpoints: int = checked(positive())
    log_images_every: int = checked(at_least(0))
    text_cache_dir: Optional[str] = MISSING
    rollout: RolloutSchema = MISSING
    train: TrainSchema = MISSING
    optim: OptimSchema = MISSING
    # Group nodes: typed here as Any, then checked against the schema their `_target_` names.
    model: Any = MISSING
    sampler: Any = MISSING
    reward: Any = MISSING
    algorithm: Any = MISSING
    hardware: Any = MISSING
    prompts: Any = MISSING
    logger: Any = MISSING


@dataclass
class ServerSchema:
    host: str = MISSING
    port: int = checked(interval(0, 65535))
    max_batch: int = checked(positive())
    max_wait_ms: float = checked(at_least(0.0))


@dataclass
class RewardServerSchema:
    """conf/reward_server.yaml; its reward and hardware groups are checked by GROUP_SCHEMAS."""

    server: ServerSchema = MISSING
    reward: Any = MISSING
    hardware: Any = MISSING


# A group's schemas, keyed by the `_target_` a node names; None keys a group without `_target_`.
GROUP_SCHEMAS: dict[str, dict[Optional[str], type]] = {
    "model": {
        schema._target_: schema for schema in (
            StableDiffusionSchema, TinyStableDiffusionSchema, SD3Schema, TinySD3Schema, FluxSchema, TinyFluxSchema,
        )
    },
    "sampler": {
        schema._target_: schema for schema in (DDIMSamplerSchema, DanceGRPOSamplerSchema, FlowGRPOSamplerSchema)
    },
    "reward": {
        "pcpo_hydra.rewards.jpeg.JpegCompressibility": JpegRewardSchema,
        "pcpo_hydra.rewards.jpeg.JpegIncompressibility": JpegRewardSchema,
        ClipScoreSchema._target_: ClipScoreSchema,
        AestheticSchema._target_: AestheticSchema,
        OcrSchema._target_: OcrSchema,
        PickScoreSchema._target_: PickScoreSchema,
        HPSv2Schema._target_: HPSv2Schema,
        ImageRewardSchema._target_: ImageRewardSchema,
        MultiRewardSchema._target_: MultiRewardSchema,
        RemoteRewardSchema._target_: RemoteRewardSchema,
        **{f"pcpo_hydra.rewards.world.{name}Agreement": WorldRewardSchema
           for name in ("Colour", "Position", "Size", "Shape")},
    },
    "algorithm": {AlgorithmSchema._target_: AlgorithmSchema},
    "hardware": {None: HardwareSchema},
    "prompts": {
        schema._target_: schema
        for schema in (SimpleAnimalsSchema, ActivitiesSchema, PromptListSchema, PromptFileSchema, WorldPromptsSchema)
    },
    "logger": {MLflowSchema._target_: MLflowSchema},
}


def schema_for(group: str, node: Any, key: str | None = None) -> type:
    """The schema a node of `group` (at `key`, the group itself by default) must follow, by its `_target_`."""
    schemas = GROUP_SCHEMAS[group]
    target = node.get("_target_") if hasattr(node, "get") else None
    if target in schemas:
        return schemas[target]
    known = ", ".join(repr(t) for t in schemas if t is not None) or "(none: this group takes no _target_)"
    raise KeyError(f"{key or group}._target_={target!r}: must be one of {known}")
