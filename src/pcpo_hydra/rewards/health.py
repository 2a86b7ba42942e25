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
