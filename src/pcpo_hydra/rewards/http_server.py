"""The HTTP side of `pcpo-reward-server`: a request batcher in front of one reward, and its handler.

Requests that arrive together are merged: one worker thread scores up to `max_batch` images in one
reward call, waiting at most `max_wait_s` for others to join the oldest request; it is also the
only thread that touches the reward model. Endpoints: GET /health and POST /score (format in
`rewards.wire`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from omegaconf import DictConfig

from pcpo_hydra.images import from_uint8
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.wire import ERROR_TYPE, decode_request, encode_scores

log = logging.getLogger(__name__)


class ServerStopping(RuntimeError):
    """The server is shutting down: answered 503, which clients retry (a restarted server may answer)."""


@dataclass
class Job:
    """One POST /score request, waiting for the worker to fill in its scores or its error."""

    pixels: np.ndarray
    prompts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[float] = field(default_factory=list)
    error: Exception | None = None


class Batcher:
    """Queues requests and scores them in merged batches on one worker thread."""

    def __init__(self, reward: BaseReward, max_batch: int, max_wait_s: float) -> None:
        self.reward = reward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.counts = {"requests": 0, "batches": 0, "images": 0}  # batches: reward calls made
        self.stopping = False
        self._pending: list[Job] = []
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="reward-batcher", daemon=True)
        self._worker.start()

    def score(self, pixels: np.ndarray, prompts: list[str]) -> list[float]:
        """The scores of one request, once the worker has served the batch it joined."""
        job = Job(pixels, prompts)
        with self._changed:
            if self.stopping:
                raise ServerStopping("reward server is stopping")
            self._pending.append(job)
            self.counts["requests"] += 1
            self._changed.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.scores

    def stop(self) -> None:
        """Fail queued requests with ServerStopping, let the batch being scored finish, end the worker."""
        with self._changed:
            self.stopping = True
            for job in self._pending:
                job.error = ServerStopping("reward server stopped before scoring this request")
                job.done.set()
            self._pending.clear()
            self._changed.notify()
        self._worker.join()

    def _work(self) -> None:
        while jobs := self._next_batch():
            self._serve(jobs)

    def _next_batch(self) -> list[Job]:
        """The oldest request and the ones that join it, after waiting for more; [] once stopping."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending or self.stopping)
            deadline = time.monotonic() + self.max_wait_s
            while not self.stopping and self._joinable_images() < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if self.stopping:
                return []
            jobs = self._joinable()
            for job in jobs:
                self._pending.remove(job)
            return jobs

    def _joinable_images(self) -> int:
        size = self._pending[0].pixels.shape[1:]
        return sum(len(job.prompts) for job in self._pending if job.pixels.shape[1:] == size)

    def _joinable(self) -> list[Job]:
        """Queued requests with the oldest one's image size, oldest first, up to max_batch images in all.

        The oldest is taken even when larger than max_batch: the reward splits it by its own batch_size.
        """
        size = self._pending[0].pixels.shape[1:]
        jobs, images = [], 0
        for job in self._pending:
            if job.pixels.shape[1:] != size:
                continue
            if jobs and images + len(job.prompts) > self.max_batch:
                break
            jobs.append(job)
            images += len(job.prompts)
        return jobs

    def _serve(self, jobs: list[Job]) -> None:
        """Score `jobs` in one reward call; if it fails, score each alone so a bad request fails only itself."""
        try:
            scores = self._score(jobs)
        except Exception as error:  # the worker must outlive any reward failure
            if len(jobs) > 1:
                log.warning("batch of %d requests failed (%s); scoring them one by one", len(jobs), error)
                for job in jobs:
                    self._serve([job])
                return
            log.error("request of %d images failed: %s: %s", len(jobs[0].prompts), type(error).__name__, error)
            jobs[0].error = error
            jobs[0].done.set()
            return
        start = 0
        for job in jobs:
            job.scores = scores[start : start + len(job.prompts)]
            start += len(job.prompts)
            job.done.set()

    def _score(self, jobs: list[Job]) -> list[float]:
        prompts = [prompt for job in jobs for prompt in job.prompts]
        self.counts["batches"] += 1
        self.counts["images"] += len(prompts)
        started = time.perf_counter()
        scores = self.reward(from_uint8(np.concatenate([job.pixels for job in jobs])), prompts).tolist()
        seconds = time.perf_counter() - started
        log.info("scored %d images from %d requests in %.3f s", len(prompts), len(jobs), seconds)
        return scores


class Handler(BaseHTTPRequestHandler):
    """GET /health and POST /score; a reward's ValueError is the client's fault (400), anything else 500."""

    server: RewardServer

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._reply(HTTPStatus.NOT_FOUND, f"no {self.path} here: GET /health or POST /score")
        batcher = self.server.batcher
        health = {"reward": batcher.reward.name, "ready": not batcher.stopping, **batcher.counts}
        self._reply(HTTPStatus.OK, json.dumps(health), "application/json")

    def do_POST(self) -> None:
        if self.path != "/score":
            return self._reply(HTTPStatus.NOT_FOUND, f"no {self.path} here: GET /health or POST /score")
        try:
            pixels, prompts = decode_request(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            scores = self.server.batcher.score(pixels, prompts)
        except ServerStopping as error:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, str(error))
        except ValueError as error:
            self._reply(HTTPStatus.BAD_REQUEST, f"{type(error).__name__}: {error}")
        except Exception as error:  # the client shows this message; the traceback is in the server log
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
        else:
            self._reply(HTTPStatus.OK, encode_scores(scores), "application/json")

    def _reply(self, status: HTTPStatus, body: str | bytes, content_type: str = ERROR_TYPE) -> None:
        data = body.encode() if isinstance(body, str) else body
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:  # the client timed out and left; it will send the request again
            log.warning("client %s left before its %d reply", self.client_address[0], status)

    def log_message(self, format: str, *args: object) -> None:
        log.debug(format, *args)  # one line per request would drown the per-batch lines


class RewardServer(ThreadingHTTPServer):
    """An HTTP server whose handlers hand their requests to one Batcher."""

    def __init__(self, address: tuple[str, int], batcher: Batcher) -> None:
        super().__init__(address, Handler)
        self.batcher = batcher


def serve(reward: BaseReward, server: DictConfig) -> None:
    """Serve `reward` at server.host:server.port until SIGTERM or SIGINT, then stop cleanly."""
    batcher = Batcher(reward, server.max_batch, server.max_wait_ms / 1000)
    httpd = RewardServer((server.host, server.port), batcher)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    host, port = httpd.server_address[:2]
    print(f"pcpo-reward-server: serving reward {reward.name!r} at http://{host}:{port}", flush=True)
    stop.wait()
    log.info("stopping: no new requests; queued ones are told to retry")
    httpd.shutdown()
    batcher.stop()
    httpd.server_close()
    log.info("stopped after %s", batcher.counts)
