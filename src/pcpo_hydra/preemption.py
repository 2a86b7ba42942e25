"""Preemption, time limits and Ctrl-C: SIGTERM / SIGUSR1 / SIGINT stop a run at the end of its epoch, checkpointed.

SLURM sends SIGUSR1 (`--signal`, hydra.launcher.signal_delay_s) before a job's time limit and
SIGTERM on preemption; a user's Ctrl-C is SIGINT. Each only marks the run; the loop finishes the
epoch it is in, all ranks agree to stop, a checkpoint is written, and then:
- inside a submitit job, submitit's own SIGUSR1 handler (its checkpoint protocol) requeues the
  job; the requeued job finds the checkpoint in its run dir and continues the same MLflow run;
- otherwise the process exits with 128 + the signal's number, and `pcpo-train resume=<run dir>`
  continues it.
A SIGINT after any of them (a second Ctrl-C) stops at once, without a checkpoint: it raises
KeyboardInterrupt, which ends the MLflow run as KILLED on its way out.
"""

from __future__ import annotations

import logging
import signal
import shlex
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised by the loop after the stop checkpoint; carries the signal that asked for it."""

    def __init__(self, signum: int, epoch: int) -> None:
        self.signum, self.epoch = signum, epoch
        super().__init__(f"stopped by {signal.Signals(signum).name} after epoch {epoch}")


class StopSignals:
    """Notes STOP_SIGNALS while installed; remembers the handlers it replaced (submitit's among them)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        if self.signum is None:
            log.warning("received %s: stopping after this epoch, with a checkpoint%s", signal.Signals(signum).name,
                        " (Ctrl-C again: stop at once, without one)" if signum == signal.SIGINT else "")
        self.signum = signum

    def agreed(self, accelerator: Any) -> int | None:
        """The stop signal if any rank got one (every rank learns it at the same epoch), else None."""
        import torch

        mine = torch.tensor([self.signum or 0], device=accelerator.device)
        signum = int(accelerator.reduce(mine, reduction="max").item()) if accelerator.num_processes > 1 else int(mine)
        return signum or None

    def hand_over(self, stop: Preempted, in_submitit_job: bool, run_dir: Path) -> None:
        """Leave the process: through submitit's requeue (it exits), else with 128 + the signal (130 for Ctrl-C)."""
        requeue = self._previous.get(signal.SIGUSR1)
        self.uninstall()
        if in_submitit_job and callable(requeue) and stop.signum != signal.SIGINT:  # a Ctrl-C is no preemption
            log.warning("%s: handing over to submitit to requeue the job", stop)
            try:
                requeue(signal.SIGUSR1, None)  # rank 0 requeues and exits; the other ranks return
            except subprocess.CalledProcessError as error:
                # `scontrol requeue` runs inside the job it requeues: SLURM's SIGTERM to the job can
                # reach it before the controller's reply does. The requeue itself went through.
                if error.returncode != -signal.SIGTERM:
                    raise
                log.warning("scontrol requeue was terminated along with the job it requeued")
        else:
            log.warning("%s; continue it with: %s", stop, resume_command(run_dir))
        raise SystemExit(128 + stop.signum)


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`, ready to paste into a shell."""
    return f"pcpo-train resume={shlex.quote(str(Path(run_dir).resolve()))}"


def interrupted_message(run_dir: Path) -> str:
    """What a second Ctrl-C leaves: no checkpoint of the epoch it cut short, the MLflow run KILLED."""
    from pcpo_hydra.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return "pcpo-train: interrupted before a checkpoint was saved; nothing to resume"
    return f"pcpo-train: interrupted; continue from {checkpoint.name} with: {resume_command(run_dir)}"
