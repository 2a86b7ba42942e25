"""What the trainer and `build.run` ask of a run tracker, and the tracker that records nothing.

MLflowTracker (tracking.py) is the one a run logs to. Ranks other than the main process, and
trainers built with `track=False`, get NullTracker, so no caller has to ask whether it has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from omegaconf import MISSING

from pcpo_hydra.config.registry import register

if TYPE_CHECKING:
    from torch import Tensor


class Tracker(Protocol):
    """One run's record: started (or resumed by id), logged to per epoch, ended with a status."""

    @property
    def run_id(self) -> str | None:
        """The run's id, kept in checkpoints so that a resumed job continues the same run."""

    def start(self, run_id: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """Create a run with these params and tags, or resume `run_id`; return its id."""

    def tag_resume(self, overrides: Sequence[str]) -> str | None:
        """Record on a resumed run the overrides this launch added."""

    def last_logged_step(self, key: str) -> int | None:
        """The highest step logged for `key`, None if never: a resumed run skips the epochs up to it."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric at `step`."""

    def log_image_grid(self, images: Tensor, captions: list[str], step: int, key: str = "samples") -> None:
        """Log captioned sample images at `step`, under `key` (the evaluation's grids have their own)."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file`."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED."""


class NullTracker:
    """A Tracker that records nothing and has no run."""

    run_id: str | None = None

    def start(self, run_id: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        return None

    def tag_resume(self, overrides: Sequence[str]) -> str | None:
        return None

    def last_logged_step(self, key: str) -> int | None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_image_grid(self, images: Tensor, captions: list[str], step: int, key: str = "samples") -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


@register("logger")
@dataclass
class MLflowSchema:
    """The logger node (conf/logger/*.yaml): where MLflowTracker records the run."""

    _target_: str = "pcpo_hydra.tracking.MLflowTracker"
    tracking_uri: Optional[str] = MISSING
    experiment_name: str = MISSING
    run_name: Optional[str] = MISSING
