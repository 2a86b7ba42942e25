"""reward=remote against a real pcpo-reward-server subprocess on loopback, and the parts it is made of."""

from __future__ import annotations

import math
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.images import from_uint8, to_uint8
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.http_server import Batcher
from pcpo_hydra.rewards.jpeg import JpegCompressibility
from pcpo_hydra.rewards.remote import RemoteReward, RemoteRewardError
from pcpo_hydra.rewards.server import check_config
from pcpo_hydra.rewards.wire import decode_request, decode_scores, encode_request, encode_scores


def images(count: int, seed: int = 0, height: int = 40, width: int = 24) -> Tensor:
    """Random images, non-square so that a transposed image would score differently."""
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ wire and config


def test_wire_round_trip_is_exact() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    prompts = ["a \"quoted\" fox", "", "ünïcödé 🦊 with a NUL\x00"]
    decoded, decoded_prompts = decode_request(encode_request(pixels, prompts))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, pixels) and decoded_prompts == prompts
    scores = torch.tensor([-1.905, 1 / 3, float("nan")], dtype=torch.float32).tolist()
    back = torch.tensor(decode_scores(encode_scores(scores), expected=3), dtype=torch.float32)
    assert torch.equal(back[:2], torch.tensor(scores[:2])) and math.isnan(back[2])
    with pytest.raises(ValueError, match="2 scores for 3 images"):
        decode_scores(encode_scores(scores[:2]), expected=3)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"garbage", "not an NPZ archive"),
        (encode_request(np.zeros((2, 4, 4, 3), np.float32), ["a", "b"]), "must be uint8"),
        (encode_request(np.zeros((2, 4, 4, 3), np.uint8), ["a"]), "1 prompts for 2 images"),
    ],
)
def test_malformed_requests_are_rejected(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_request(body)


def test_eight_bits_on_the_wire_lose_nothing_a_reward_sees() -> None:
    """Every reward quantises with to_uint8; the server's floats quantise back to the client's pixels."""
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3).numpy()
    assert np.array_equal(to_uint8(from_uint8(levels)), levels)


def compose_server(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="reward_server", overrides=list(overrides))


def test_server_config_resolves_the_device_and_is_checked_like_training() -> None:
    cfg = check_config(compose_server("reward=clipscore", "hardware=gpu1", "reward.batch_size=8"))
    assert cfg.reward.device == "cuda" and cfg.server.max_batch == 8 and cfg.server.host == "127.0.0.1"
    with pytest.raises(ConfigError) as error:
        check_config(compose_server("server.port=70000", "reward.dtype=float64", "reward=clipscore"))
    assert error.value.problems == [
        "server.port=70000: must be a number in [0, 65535]",
        "reward.dtype='float64': must be one of 'float32', 'float16', 'bfloat16'",
    ]
    with pytest.raises(ConfigError, match="reward=remote: a server must serve a reward of its own"):
        check_config(compose_server("reward=remote"))


def test_a_reward_without_a_batch_size_is_served_in_batches_of_16() -> None:
    """A multi reward has no batch_size of its own for server.max_batch to follow (it failed to resolve)."""
    cfg = check_config(compose_server("reward=multi", "reward.components.clip.batch_size=4"))
    assert cfg.server.max_batch == 16 and cfg.reward.components.clip.batch_size == 4
    assert check_config(compose_server("server.max_batch=3", "reward=multi")).server.max_batch == 3


def test_remote_option_validates_and_rejects_bad_values(compose_cfg) -> None:
    reward = validate(compose_cfg("reward=remote")).reward
    assert (reward.url, reward.retries, reward.timeout_s) == ("http://127.0.0.1:8765", 8, 120.0)
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg("reward=remote", "reward.url=127.0.0.1:8765", "reward.retries=-1"))
    assert error.value.problems == [
        "reward.url='127.0.0.1:8765': must be an http:// or https:// URL",
        "reward.retries=-1: must be a number >= 0",
    ]


# ------------------------------------------------------------------------- batching, in process


class MeanOrFail(BaseReward):
    """Mean pixel value; raises on the prompt 'bad' as a reward does on input it cannot score."""

    name = "mean_or_fail"

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        if "bad" in prompts:
            raise ValueError("cannot score 'bad'")
        return images.mean(dim=(1, 2, 3))


def test_batcher_merges_same_size_requests_and_a_failure_stays_with_its_request() -> None:
    batcher = Batcher(MeanOrFail(), max_batch=8, max_wait_s=0.3)
    pixels = [to_uint8(images(2, seed)) for seed in range(3)]
    jobs = [(pixels[0], ["a", "b"]), (pixels[1], ["bad", "c"]), (pixels[2], ["d", "e"]),
            (to_uint8(images(1, 3, height=8)), ["other size"])]
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(batcher.score, *job) for job in jobs]
            with pytest.raises(ValueError, match="cannot score 'bad'"):
                futures[1].result(timeout=10)
            for future, (job_pixels, _) in zip(futures[::2], jobs[::2]):
                expected = from_uint8(job_pixels).mean(dim=(1, 2, 3))
                torch.testing.assert_close(torch.tensor(future.result(timeout=10)), expected)
            assert len(futures[3].result(timeout=10)) == 1
    finally:
        batcher.stop()
    # one merged call of the three 40x24 requests, failing; each of them alone; the 8x24 one alone
    assert batcher.counts == {"requests": 4, "batches": 5, "images": 13}


# ------------------------------------------------------------------- client retries, no server


@contextmanager
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback server that accepts connections and never answers; yields its URL and the connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        done.set()
        thread.join()
        for connection in [listener, *accepted]:
            connection.close()


def test_a_server_that_never_answers_fails_after_the_retries_in_bounded_time() -> None:
    with silent_server() as (url, connections):
        reward = RemoteReward(url, timeout_s=0.3, retries=2, backoff_s=0.05)
        started = time.monotonic()
        with pytest.raises(RemoteRewardError) as error:
            reward(images(1), ["a"])
        elapsed = time.monotonic() - started
        assert len(connections) == 3  # the first attempt and two retries
    assert 3 * 0.3 + 0.05 + 0.1 <= elapsed < 3
    message = str(error.value)
    assert f"reward server {url}/score failed 3 attempts" in message and "timed out" in message
    assert "reward.url" in message and error.value.status is None


def test_an_unreachable_server_names_the_url_and_the_key() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # a port nobody listens on once closed
    expected = rf"{url}/score failed 2 attempts.*Connection refused.*reward\.url"
    with pytest.raises(RemoteRewardError, match=expected):
        RemoteReward(url, retries=1, backoff_s=0.01)(images(1), ["a"])


# ------------------------------------------------------------------- the real server, as a process


class ServerProcess:
    """`python -m pcpo_hydra.rewards.server` on loopback; its output goes to a log file per start."""

    def __init__(self, folder: Path, *overrides: str) -> None:
        self.folder, self.overrides = folder, overrides
        self.port, self.starts = 0, 0
        self.process: subprocess.Popen | None = None
        self.log = folder / "unstarted.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on the last port (port 0, a free one, at first) and wait for the URL it prints."""
        self.log = self.folder / f"server{self.starts}.log"
        self.starts += 1
        command = [sys.executable, "-m", "pcpo_hydra.rewards.server", *self.overrides,
                   "server.host=127.0.0.1", f"server.port={self.port}"]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + 60
        while not (found := re.search(r"at http://127\.0\.0\.1:(\d+)", self.log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"reward server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.port = int(found.group(1))

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL if still running after 10 s); the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("reward_server"), "reward=jpeg_compressibility",
                            "server.max_batch=64", "server.max_wait_ms=200")
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.mark.integration
def test_remote_scores_equal_the_in_process_reward(server: ServerProcess) -> None:
    batch, prompts = images(7), [f"prompt {i}" for i in range(7)]
    reward = RemoteReward(server.url, batch_size=3)  # three requests: 3 + 3 + 1
    scores = reward(batch, prompts)
    quantised = torch.from_numpy(to_uint8(batch)).permute(0, 3, 1, 2).float() / 255
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    assert torch.equal(scores, JpegCompressibility()(quantised, prompts))
    assert torch.equal(scores, JpegCompressibility()(batch, prompts))
    assert reward.health()["reward"] == "jpeg_compressibility" and reward.health()["ready"] is True


@pytest.mark.integration
def test_concurrent_clients_share_batches_and_each_gets_its_own_scores(server: ServerProcess) -> None:
    clients = 8
    before = RemoteReward(server.url).health()
    batches = [images(2, seed) for seed in range(clients)]
    start = threading.Barrier(clients)

    def client(batch: Tensor) -> Tensor:
        start.wait()
        return RemoteReward(server.url)(batch, ["a", "b"])

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, batches))
    for batch, scores in zip(batches, results):
        assert torch.equal(scores, JpegCompressibility()(batch, ["a", "b"]))
    after = RemoteReward(server.url).health()
    assert after["requests"] - before["requests"] == clients
    assert after["batches"] - before["batches"] < clients
    served = [int(n) for n in re.findall(r"from (\d+) requests", server.log.read_text())]
    assert max(served) > 1


@pytest.mark.integration
def test_server_errors_reach_the_client_and_are_not_retried(server: ServerProcess) -> None:
    reward = RemoteReward(server.url, retries=5, backoff_s=5.0)  # a retry would take >= 5 s
    requests_before = reward.health()["requests"]
    started = time.monotonic()
    too_wide = torch.zeros(1, 3, 1, 70_000)  # PIL's JPEG encoder stops at 65,500 px
    with pytest.raises(RemoteRewardError, match="answered 500: OSError: broken data stream") as error:
        reward(too_wide, ["wider than JPEG allows"])
    assert error.value.status == 500 and reward.health()["requests"] == requests_before + 1
    with pytest.raises(RemoteRewardError, match="answered 404: no /elsewhere/score here") as error:
        RemoteReward(server.url + "/elsewhere", retries=5, backoff_s=5.0)(images(1), ["a"])
    assert time.monotonic() - started < 4
    request = urllib.request.Request(server.url + "/score", data=b"garbage")
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
    assert http_error.value.code == 400 and b"not an NPZ archive" in http_error.value.read()


@pytest.mark.integration
def test_a_server_restart_mid_run_loses_no_reward(server: ServerProcess) -> None:
    batch, prompts = images(4, seed=5), ["a", "b", "c", "d"]
    expected = JpegCompressibility()(batch, prompts)
    reward = RemoteReward(server.url, retries=12, backoff_s=0.05, timeout_s=10)
    assert torch.equal(reward(batch[:2], prompts[:2]), expected[:2])
    assert server.stop() == 0 and "stopped after" in server.log.read_text()  # SIGTERM stops it cleanly
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(reward, batch, prompts)
        time.sleep(0.3)
        assert not pending.done()  # refused, and retrying
        server.start()  # the same port
        assert torch.equal(pending.result(timeout=30), expected)


def test_the_server_command_checks_its_config_before_importing_torch() -> None:
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from pcpo_hydra.rewards.server import check_config\n"
        "from pcpo_hydra.config.hydra_setup import config_dir\n"
        "with initialize_config_dir(config_dir=config_dir(), version_base='1.3'):\n"
        "    check_config(compose(config_name='reward_server', overrides=['reward=clipscore']))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
