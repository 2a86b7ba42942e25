"""Processes and devices: one distributed entry for every launcher, Accelerate (+ DeepSpeed ZeRO), seeding.

How a run's processes come to exist decides nothing else:
- inside a submitit job (hydra/launcher=slurm or =local), the job's task layout is exported as
  torch.distributed's environment (MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK, ...);
- under `torchrun` / `accelerate launch` that environment is already there;
- a plain `pcpo-train` whose hardware asks for several processes on one node spawns them here.
Accelerate then initialises from the environment, with DeepSpeed when `hardware.deepspeed` is set.
"""

from __future__ import annotations

import ctypes
import logging
import logging.config
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from omegaconf import DictConfig

log = logging.getLogger(__name__)

_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # what a spawning parent passes on to its ranks
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


class LaunchError(RuntimeError):
    """The processes that exist do not match what `hardware` asks for."""


def world_size(hardware: DictConfig) -> int:
    return hardware.nodes * hardware.processes_per_node


def in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def export_submitit_environment() -> None:
    """The submitit job's tasks become torch.distributed ranks (env:// initialisation)."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launch(job: Callable[[], Any], hardware: DictConfig, logging_config: dict | None = None) -> Any:
    """Run `job` on every rank of the run's world and return rank 0's result.

    `logging_config` (Hydra's resolved job logging) is applied in spawned ranks, which do not
    inherit the parent's handlers.
    """
    wanted = world_size(hardware)
    if in_submitit_job():
        export_submitit_environment()
    if "WORLD_SIZE" in os.environ:
        found = int(os.environ["WORLD_SIZE"])
        if found != wanted:
            raise LaunchError(
                f"the launcher started {found} processes but hardware asks for {wanted} "
                f"(hardware.nodes={hardware.nodes} x hardware.processes_per_node={hardware.processes_per_node}); "
                "make them agree"
            )
        return job()
    if wanted == 1:
        if hardware.deepspeed is not None:  # DeepSpeed always runs in a process group, here of one
            _export_rank(0, 1, free_port())
        return job()
    if hardware.nodes > 1:
        raise LaunchError(
            f"hardware.nodes={hardware.nodes}: several nodes need a launcher that starts a process on each "
            "(hydra/launcher=slurm, or torchrun on every node)"
        )
    return spawn_local(job, wanted, logging_config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_local(job: Callable[[], Any], nprocs: int, logging_config: dict | None) -> Any:
    """`nprocs` ranks on this machine; one failing fails all, with its traceback; signals are passed on.

    The ranks start with SIGINT ignored and leave the terminal's process group (see _spawned_rank),
    so a Ctrl-C reaches each rank once, forwarded from here, rather than twice (from the terminal
    and from here), which a rank would take for the second Ctrl-C that aborts. After a second
    one this process waits for the ranks to end their MLflow run, then raises KeyboardInterrupt.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the ranks as they start
    try:
        context = mp.start_processes(
            _spawned_rank, args=(nprocs, port, job, logging_config, results, os.getpid()), nprocs=nprocs,
            join=False, start_method="spawn",
        )
    finally:
        signal.signal(signal.SIGINT, interrupt)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        log.warning("received %s: passing it on to the %d ranks", signal.Signals(signum).name, nprocs)
        for pid in context.pids():
            os.kill(pid, signum)

    def aborted() -> bool:  # a SIGINT after any stop signal: the ranks stop at once, as StopSignals does
        return signal.SIGINT in received[1:]

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        while not context.join():
            pass
    except Exception:
        if not aborted():  # a rank left waiting in a collective by an aborted rank 0 fails: not news
            raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if aborted():
        raise KeyboardInterrupt
    outcome, value = results.get()
    if outcome == "exit":  # rank 0 stopped on purpose (a preemption checkpoint): leave the same way
        raise SystemExit(value)
    return value


def _spawned_rank(
    local_rank: int, nprocs: int, port: int, job: Callable[[], Any], logging_config: dict | None, results: Any,
    parent: int,
) -> None:
    """Body of one spawned rank: its own process group, death with the parent, the env:// variables, the job."""
    os.setpgrp()  # out of the terminal's group: Ctrl-C comes through the parent (see spawn_local)
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored only while the rank started
    _export_rank(local_rank, nprocs, port)
    if logging_config:
        logging.config.dictConfig(logging_config)
    try:
        value = job()
    except SystemExit as stop:
        if local_rank == 0:
            results.put(("exit", stop.code))
        return
    except KeyboardInterrupt:  # a second Ctrl-C: the parent reports it
        return
    if local_rank == 0:
        results.put(("result", value))


def die_with_parent(parent: int) -> None:
    """Have this process killed when `parent` dies, kill -9 included, so no rank trains on as an orphan
    (racing the ranks of a resume for the same run dir).

    Linux's parent-death signal where there is one, else a thread that polls for the parent.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _export_rank(rank: int, nprocs: int, port: int) -> None:
    """env:// variables of rank `rank` of a one-node group listening on loopback `port`."""
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs),
    })


def deepspeed_config(hardware: DictConfig, train: DictConfig, accumulation_steps: int) -> dict[str, Any]:
    """The DeepSpeed JSON for `hardware.deepspeed`: ZeRO stage, offload, buckets, precision, clipping."""
    ds = hardware.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": hardware.device == "cuda"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": hardware.device == "cuda"}
    if ds.stage == 3:  # final weights are written whole, gathered from the shards
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": hardware.mixed_precision == "bf16"},
        "fp16": {"enabled": hardware.mixed_precision == "fp16"},
        "steps_per_print": 2**31 - 1,
    }


def build_accelerator(hardware: DictConfig, train: DictConfig, accumulation_steps: int) -> Accelerator:
    """One Accelerator for the run; it owns the device, precision, accumulation and the process group."""
    if hardware.num_threads is not None:
        torch.set_num_threads(hardware.num_threads)
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hardware.device='cuda' but no CUDA device is visible; use hardware=cpu")
    backend = hardware.backend or ("nccl" if hardware.device == "cuda" else "gloo")
    timeout = timedelta(minutes=hardware.collective_timeout_min)
    plugin = None
    if hardware.deepspeed is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(hardware, train, accumulation_steps))
        if hardware.device == "cpu":
            # Accelerate picks no process-group backend for DeepSpeed without a GPU; naming it here
            # (before the Accelerator exists) gives ZeRO over gloo.
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            PartialState(backend=backend, timeout=timeout)
    group = [InitProcessGroupKwargs(backend=backend, timeout=timeout)] if "WORLD_SIZE" in os.environ else []
    return Accelerator(
        cpu=hardware.device == "cpu" and plugin is None,
        mixed_precision=hardware.mixed_precision,
        gradient_accumulation_steps=accumulation_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=group,
    )


def weight_dtype(hardware: DictConfig) -> torch.dtype:
    """dtype of frozen weights (VAE, text encoder, LoRA base); trainable weights stay float32."""
    return _WEIGHT_DTYPES[hardware.mixed_precision]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch. Every rank uses the same seed: rollout noise is seeded per batch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Seed of the rollout noise of one (epoch, global batch): any split over ranks draws the same noise."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint64)[0])
