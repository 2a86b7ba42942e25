"""`reward=remote`: a reward scored by `pcpo-reward-server` in another process, over HTTP.

This keeps a large reward model (a VLM, say) on its own GPU and out of the training processes.
Scoring is a pure function of the images and prompts, so a request that timed out or met a
restarting server is simply sent again: with enough `retries` a server restart costs time, never
a reward. The wire format is in `rewards.wire`.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from http import HTTPStatus

import torch
from torch import Tensor

from pcpo_hydra.images import to_uint8
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.health import server_problem
from pcpo_hydra.rewards.wire import REQUEST_TYPE, decode_scores, encode_request
from pcpo_hydra.weights import ModelLoadError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0  # the doubling wait between retries stops growing here


class RemoteRewardError(RuntimeError):
    """The reward server refused a request (`status` set) or could not be reached (`status` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteReward(BaseReward):
    """Sends each batch of `batch_size` images to a reward server and returns its scores."""

    name = "remote"

    def __init__(
        self,
        url: str = "http://127.0.0.1:8765",
        timeout_s: float = 120.0,
        retries: int = 8,
        backoff_s: float = 1.0,
        batch_size: int = 32,
        health_wait_s: float | None = None,
    ) -> None:
        super().__init__(batch_size)
        if health_wait_s is not None:  # the server may have gone while the model was built: ask it again
            problem = server_problem(url, health_wait_s)
            if problem:
                raise ModelLoadError(f"reward.url={url!r}: {problem}; start pcpo-reward-server there, "
                                     "or set reward.url to where it runs")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        # No proxies: an http_proxy set for the hub must not capture requests to a local server.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        reply = self._request("/score", encode_request(to_uint8(images), prompts))
        return torch.tensor(decode_scores(reply, len(prompts)), dtype=torch.float32)

    def health(self) -> dict:
        """The server's GET /health: the reward it serves, whether it is ready, its request counters."""
        return json.loads(self._request("/health"))

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        """The reply body; retries unreachable, timed-out and 503 attempts, raises on any other error."""
        url = self.url + path
        headers = {"Content-Type": REQUEST_TYPE} if body is not None else {}
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                request = urllib.request.Request(url, data=body, headers=headers)
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                message = error.read().decode("utf-8", "replace").strip()
                if error.code != HTTPStatus.SERVICE_UNAVAILABLE:  # bad input or a broken reward: retrying won't help
                    raise RemoteRewardError(f"reward server {url} answered {error.code}: {message}",
                                            error.code) from None
                failure = f"{error.code} {message}"
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out
                failure = f"{type(error).__name__}: {error}"
            log.warning("reward server %s: %s (attempt %d of %d)", url, failure, attempt + 1, self.retries + 1)
        raise RemoteRewardError(
            f"reward server {url} failed {self.retries + 1} attempts, the last with {failure}. Start "
            f"pcpo-reward-server there, or set reward.url to where it runs (reward.retries, "
            f"reward.backoff_s and reward.timeout_s set how long to keep trying)"
        )
