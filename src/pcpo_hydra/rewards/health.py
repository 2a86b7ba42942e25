"""Is a pcpo-reward-server up? Asked once before the first epoch, with a bounded wait.

Without it a dead `reward.url` surfaced at the first reward call, after the model was built and
the epoch sampled, and only after the client's retries (minutes). Kept free of torch, so the
question costs no more than the wait.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

HEALTH_PATH = "/health"
RETRY_EVERY_S = 0.25  # a server that is starting: ask again this often until the wait is over


def server_problem(url: str, wait_s: float) -> str | None:
    """Why `url` shows no reward server within `wait_s` seconds (at least one try), else None."""
    health = url.rstrip("/") + HEALTH_PATH
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # as the reward's own requests
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with opener.open(health, timeout=max(deadline - time.monotonic(), RETRY_EVERY_S)) as reply:
                body = reply.read()
        except urllib.error.HTTPError as error:  # something answers, but not our server
            return f"GET {health} answered {error.code} {error.reason}: not a pcpo-reward-server"
        except OSError as error:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = getattr(error, "reason", error)
                return f"no reward server answers GET {health} within {wait_s:g} s ({reason})"
            time.sleep(min(RETRY_EVERY_S, remaining))
            continue
        try:
            json.loads(body)["reward"]
        except (ValueError, KeyError, TypeError):
            return f"GET {health} answered, but not as a pcpo-reward-server (no reward named in {body[:80]!r})"
        return None


@dataclass(frozen=True)
class RewardServerUp:
    """A schema's need (see config.needs): a pcpo-reward-server answering at the node's `url_field`.

    It is given the node's `wait_field` seconds to answer; null there means it is not asked.
    """

    url_field: str
    wait_field: str

    def problem(self, node: Any, key: str) -> str | None:
        url, wait_s = getattr(node, self.url_field), getattr(node, self.wait_field)
        if wait_s is None:
            return None
        problem = server_problem(url, wait_s)
        if problem is None:
            return None
        return (f"{key}.{self.url_field}={url!r}: {problem}; fix: start pcpo-reward-server there, or set "
                f"{key}.{self.url_field} to where it runs ({key}.{self.wait_field}={wait_s:g} s: how long to wait)")
