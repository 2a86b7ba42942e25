"""Schemas of every config node. A group's node is checked against the schema its `_target_` names.

Only plain dataclasses here (no torch), so validation runs in well under a second, before any
model is built. Field defaults mirror conf/; the YAML files stay the source of every default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterator, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import Constraint, at_least, checked, interval, one_of, positive
from pcpo_hydra.config.needs import Executable, PythonModule, RewardServer
from pcpo_hydra.prompts import prompt_file_problem
from pcpo_hydra.world import grammar as world

# ---------------------------------------------------------------------------------------- model


@dataclass
class LoraSchema:
    enabled: bool = True
    rank: int = checked(4, positive())
    alpha: float = checked(4.0, positive())
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class PretrainedSchema:
    """Weights from a hub id or a local folder (models and rewards alike)."""

    pretrained: str = MISSING
    revision: Optional[str] = None


@dataclass
class PolicySchema:
    """What every model node takes: guidance, what trains, and whether text encoders leave the device."""

    guidance_scale: float = checked(5.0, at_least(1.0))
    offload_text_encoders: bool = False  # embed all prompts once (text cache), then unload the encoders
    lora: LoraSchema = field(default_factory=LoraSchema)


@dataclass
class PretrainedPolicySchema(PretrainedSchema, PolicySchema):
    resolution: int = checked(512, positive())
    gradient_checkpointing: bool = False


@dataclass
class TinyPolicySchema(PolicySchema):
    seed: int = 0  # torch.manual_seed takes any int (the run's seed, bounded below, is what numpy sees)
    resolution: int = checked(32, positive())


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
    max_sequence_length: int = checked(256, positive())  # T5 tokens


@dataclass
class TinySD3Schema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.tiny_sd3.build_tiny_sd3"


@dataclass
class FluxSchema(PretrainedPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.flux.load_flux"
    guidance: float = checked(3.5, at_least(0.0))  # the distilled guidance FLUX.1-dev embeds
    max_sequence_length: int = checked(512, positive())  # T5 tokens


@dataclass
class TinyFluxSchema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.tiny_flux.build_tiny_flux"
    guidance: float = checked(3.5, at_least(0.0))


# -------------------------------------------------------------------------------------- sampler


@dataclass
class DDIMSamplerSchema:
    FAMILY: ClassVar[str] = "diffusion"  # the model family it steps (epsilon prediction)
    _target_: str = "pcpo_hydra.samplers.build_ddim_sampler"
    num_steps: int = checked(50, positive())
    eta: float = checked(1.0, interval(0.0, 1.0, low_open=True))


@dataclass
class DanceGRPOSamplerSchema:
    FAMILY: ClassVar[str] = "flow"  # velocity prediction
    _target_: str = "pcpo_hydra.samplers.build_dancegrpo_sampler"
    num_steps: int = checked(16, positive())
    eta: float = checked(0.3, positive())
    shift: Optional[float] = checked(None, positive())  # None: the model's own schedule


@dataclass
class FlowGRPOSamplerSchema:
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.samplers.build_flowgrpo_sampler"
    num_steps: int = checked(10, positive())
    noise_level: float = checked(0.7, positive())


# --------------------------------------------------------------------------------------- reward


@dataclass
class JpegRewardSchema:
    _target_: str = MISSING
    batch_size: int = checked(32, positive())
    quality: int = checked(95, interval(1, 100))


@dataclass
class RewardModelSchema:
    """What every reward with a network takes: how many images a call scores, where and in what dtype."""

    batch_size: int = checked(32, positive())
    device: str = "cpu"
    dtype: str = checked("float32", one_of("float32", "float16", "bfloat16"))


@dataclass
class ClipScoreSchema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.clip_score.ClipScore"
    scale: float = checked(100.0, positive())


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
    batch_size: int = checked(32, positive())
    lang: str = "eng"
    psm: int = checked(6, one_of(1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))
    thresholding: str = checked("sauvola", one_of("otsu", "leptonica_otsu", "sauvola"))
    min_side: int = checked(256, at_least(0))
    workers: int = checked(4, positive())
    tesseract_cmd: Optional[str] = None


@dataclass
class MultiRewardSchema:
    """Each component is a whole reward node, checked against its own schema (see NESTED)."""

    NESTED: ClassVar[dict[str, str]] = {"components": "reward"}  # field -> group its values belong to
    _target_: str = "pcpo_hydra.rewards.multi.MultiReward"
    components: Dict[str, Any] = field(default_factory=dict)
    weights: Dict[str, float] = field(default_factory=dict)

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
    url: str = checked("http://127.0.0.1:8765", Constraint(
        lambda v: v.startswith(("http://", "https://")), "an http:// or https:// URL"))
    timeout_s: float = checked(120.0, positive())
    retries: int = checked(8, at_least(0))
    backoff_s: float = checked(1.0, at_least(0.0))
    batch_size: int = checked(32, positive())
    health_wait_s: Optional[float] = checked(5.0, at_least(0.0))  # null: the server is not asked before use


# Shapes world (pcpo_hydra.world, conf/reward/world_*.yaml): every world reward takes only a batch size.


@dataclass
class WorldRewardSchema:
    _target_: str = MISSING
    batch_size: int = checked(32, positive())


# ------------------------------------------------------------------------------------ algorithm


@dataclass
class AlgorithmSchema:
    _target_: str = "pcpo_hydra.algorithms.build.build_algorithm"
    objective: str = checked("log_hinge", one_of("ratio", "log_hinge"))
    log_ratio: str = checked("matching", one_of("direct", "matching"))
    credit: str = checked("proportional", one_of("native", "proportional"))
    credit_mode: Optional[str] = checked(None, one_of("variance", "reweight"))
    clip_range: float = checked(1e-4, positive())
    adv_clip_max: float = checked(5.0, positive())
    kl_beta: float = checked(0.0, at_least(0.0))
    advantage: str = checked("group", one_of("group", "per_prompt"))
    stat_buffer_size: int = checked(32, positive())
    stat_min_count: int = checked(16, positive())


# ------------------------------------------------------------------------- hardware, prompts, logger


@dataclass
class DeepSpeedSchema:
    """ZeRO through Accelerate's DeepSpeed plugin; `null` in place of this node trains without DeepSpeed."""

    stage: int = checked(2, one_of(0, 1, 2, 3))
    offload_optimizer: bool = False   # optimizer states (and the step) in CPU memory
    offload_params: bool = False      # parameters in CPU memory between uses (stage 3 only)
    overlap_comm: bool = True         # overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True
    reduce_bucket_size: int = checked(500_000_000, positive())     # elements per gradient reduction
    allgather_bucket_size: int = checked(500_000_000, positive())  # elements per parameter all-gather

    def relations(self, prefix: str) -> Iterator[str]:
        if self.offload_params and self.stage != 3:
            yield f"{prefix}.offload_params=True: needs {prefix}.stage=3 (got {self.stage})"


@dataclass
class SlurmResourcesSchema:
    """What hydra/launcher=slurm (and =local) asks for; conf/hydra/launcher/*.yaml read these."""

    nodes: int = checked(1, positive())
    tasks_per_node: int = checked(1, positive())   # one training process per task
    gpus_per_node: int = checked(0, at_least(0))
    cpus_per_task: int = checked(2, positive())
    mem_gb: int = checked(16, at_least(0))         # 0: all of the node's memory
    timeout_min: int = checked(60, positive())
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    signal_delay_s: int = checked(120, positive())  # SIGUSR1 this long before the time limit


@dataclass
class HardwareSchema:
    device: str = checked("cpu", one_of("cpu", "cuda"))
    mixed_precision: str = checked("no", one_of("no", "fp16", "bf16"))
    num_threads: Optional[int] = checked(None, positive())
    nodes: int = checked(1, positive())
    processes_per_node: int = checked(1, positive())  # one per GPU; world size = nodes x this
    backend: Optional[str] = checked(None, one_of("gloo", "nccl"))  # null: nccl on cuda, gloo on cpu
    collective_timeout_min: int = checked(30, positive())  # a rank waiting longer on the others fails
    deepspeed: Optional[DeepSpeedSchema] = None
    slurm: SlurmResourcesSchema = field(default_factory=SlurmResourcesSchema)

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
    colours: list[str] = checked(MISSING, _words_of(tuple(world.COLOURS)))
    shapes: list[str] = checked(MISSING, _words_of(world.SHAPES))
    sizes: list[str] = checked(MISSING, _words_of(tuple(world.SIZES)))
    positions: list[str] = checked(MISSING, _words_of(tuple(world.POSITIONS)))


@dataclass
class MLflowSchema:
    _target_: str = "pcpo_hydra.tracking.MLflowTracker"
    tracking_uri: Optional[str] = None
    experiment_name: str = "pcpo-hydra"
    run_name: Optional[str] = None


# ---------------------------------------------------------------------------------- top level


@dataclass
class RolloutSchema:
    prompts_per_epoch: int = checked(8, positive())
    group_size: int = checked(4, at_least(2))
    batch_size: int = checked(16, positive())


@dataclass
class TrainSchema:
    batch_size: int = checked(8, positive())
    inner_epochs: int = checked(1, positive())
    timestep_fraction: float = checked(1.0, interval(0.0, 1.0, low_open=True))
    num_updates: int = checked(1, positive())
    steps_per_forward: int = checked(1, positive())
    max_grad_norm: float = checked(1.0, positive())
    max_nan_steps: int = checked(20, positive())  # micro-batches in a row with a non-finite loss before the run stops


@dataclass
class OptimSchema:
    lr: float = checked(3e-4, positive())
    weight_decay: float = checked(1e-4, at_least(0.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = checked(1e-8, positive())


@dataclass
class RunSchema:
    """Top-level keys; the groups are checked by their own schemas (GROUP_SCHEMAS)."""

    seed: int = checked(0, interval(0, 2**32 - 1))  # numpy's seeding takes no negative, nothing from 2**32
    epochs: int = checked(20, positive())
    resume: Optional[str] = None
    run_name: Optional[str] = None
    checkpoint_every: int = checked(5, at_least(0))
    keep_checkpoints: int = checked(2, positive())
    log_images_every: int = checked(5, at_least(0))
    text_cache_dir: Optional[str] = None
    rollout: RolloutSchema = field(default_factory=RolloutSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    # Group nodes: typed here as Any, then checked against the schema their `_target_` names.
    model: Any = None
    sampler: Any = None
    reward: Any = None
    algorithm: Any = None
    hardware: Any = None
    prompts: Any = None
    logger: Any = None


@dataclass
class ServerSchema:
    host: str = "127.0.0.1"
    port: int = checked(8765, interval(0, 65535))
    max_batch: int = checked(32, positive())
    max_wait_ms: float = checked(20.0, at_least(0.0))


@dataclass
class RewardServerSchema:
    """conf/reward_server.yaml; its reward and hardware groups are checked by GROUP_SCHEMAS."""

    server: ServerSchema = field(default_factory=ServerSchema)
    reward: Any = None
    hardware: Any = None


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
