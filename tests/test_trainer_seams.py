"""The trainer's seams: the Tracker protocol and its no-op tracker."""

from __future__ import annotations

import inspect

from pcpo_hydra.tracker import NullTracker, Tracker
from pcpo_hydra.tracking import MLflowTracker

PROTOCOL = [name for name in vars(Tracker) if not name.startswith("_")]


def test_mlflow_and_null_trackers_have_every_tracker_method_with_its_parameters() -> None:
    assert sorted(PROTOCOL) == ["end", "last_logged_step", "log_artifact", "log_image_grid", "log_metrics",
                                "log_text", "run_id", "start", "tag_resume"]
    for name in PROTOCOL:
        if name == "run_id":
            continue
        expected = list(inspect.signature(getattr(Tracker, name)).parameters)
        for tracker in (MLflowTracker, NullTracker):
            assert list(inspect.signature(getattr(tracker, name)).parameters) == expected, (tracker, name)
    null = NullTracker()
    assert null.run_id is None and null.start(None, {}, {}) is None and null.last_logged_step("x") is None

