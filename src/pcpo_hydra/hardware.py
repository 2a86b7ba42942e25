"""The hardware group's schema: device, precision, ranks, DeepSpeed ZeRO and what SLURM is asked for.

Torch-free, so it is checked before anything heavy; pcpo_hydra.distributed launches what it describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import at_least, checked, one_of, positive
from pcpo_hydra.config.registry import register


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


@register("hardware", None)
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
