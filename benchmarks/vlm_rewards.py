"""Seconds per 32 images of the VLM rewards, and what pcpo-reward-server's batching of concurrent requests gains.

On the tiny Qwen2.5-VL and tiny BERT the tests use (tests/tiny_vlm.py: the real classes, random weights),
so it runs anywhere; with `--vlm` / `--encoder` folders it times real checkpoints the same way.

1. In process: `reward(images, prompts)` for 32 images, median of `--repeats` calls, for
   vlm_bertscore and vlm_judge.
2. The server: `--clients` clients at once, each sending `--per-client` images to one
   pcpo-reward-server, with batching (server.max_batch = all the clients' images) and without
   (server.max_batch = one request's images, so each request is its own reward call). The gain is
   the ratio of the two wall times, measured in one invocation.

    python benchmarks/vlm_rewards.py
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny VLM and encoder
from tiny_vlm import save_tiny_bert, save_tiny_qwen25_vl  # noqa: E402

from pcpo_hydra.rewards.remote import RemoteReward  # noqa: E402
from pcpo_hydra.rewards.vlm_bertscore import VLMBertScore  # noqa: E402
from pcpo_hydra.rewards.vlm_judge import VLMJudge  # noqa: E402

PROMPTS = ["a cat riding a bike", "a dog sitting on a mat", "a red car", "a cat"]


def images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def in_process(args: argparse.Namespace, vlm: str, encoder: str) -> dict[str, float]:
    """Median seconds per `args.images` images of each VLM reward, called in this process."""
    rewards = {
        "vlm_bertscore": VLMBertScore(pretrained=vlm, bertscore_model=encoder, bertscore_layer=args.layer,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
        "vlm_judge": VLMJudge(pretrained=vlm, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
    }
    batch = images(args.images, args.side)
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(args.images)]
    seconds = {}
    for name, reward in rewards.items():
        reward(batch[:2], prompts[:2])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            reward(batch, prompts)
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return seconds


def serve(max_batch: int, vlm: str, encoder: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """A pcpo-reward-server for vlm_bertscore on a free loopback port; (process, url) once it listens."""
    command = [sys.executable, "-m", "pcpo_hydra.rewards.server", "reward=vlm_bertscore",
               f"reward.pretrained={vlm}", f"reward.bertscore_model={encoder}", f"reward.bertscore_layer={args.layer}",
               f"reward.max_new_tokens={args.max_new_tokens}", f"reward.batch_size={max_batch}",
               f"server.max_batch={max_batch}", "server.max_wait_ms=50", "server.host=127.0.0.1", "server.port=0"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (found := re.search(r"at (http://127\.0\.0\.1:\d+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"reward server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return process, found.group(1)


def concurrent_seconds(url: str, args: argparse.Namespace) -> float:
    """Wall seconds for `args.clients` clients sending `args.per_client` images each at once (median of repeats)."""
    batches = [images(args.per_client, args.side, seed) for seed in range(args.clients)]
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(args.per_client)]

    def client(batch: torch.Tensor) -> torch.Tensor:
        return RemoteReward(url, batch_size=args.per_client)(batch, prompts)

    times = []
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client, batches))  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            list(pool.map(client, batches))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def server_gain(args: argparse.Namespace, vlm: str, encoder: str, folder: Path) -> dict[str, float]:
    """Concurrent clients' wall seconds with the server merging their requests and with each request alone."""
    seconds = {}
    for name, max_batch in (("batched", args.clients * args.per_client), ("one_request_per_call", args.per_client)):
        process, url = serve(max_batch, vlm, encoder, args, folder / f"server_{name}.log")
        try:
            seconds[name] = concurrent_seconds(url, args)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return seconds


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", help="a VLM folder (default: the tests' tiny Qwen2.5-VL)")
    parser.add_argument("--encoder", help="a BERTScore encoder folder (default: the tests' tiny BERT)")
    parser.add_argument("--layer", type=int, default=2, help="the encoder layer BERTScore compares")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="reward.batch_size in process")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=4, help="images per client request")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        vlm = args.vlm or str(save_tiny_qwen25_vl(folder / "vlm"))
        encoder = args.encoder or str(save_tiny_bert(folder / "encoder"))
        local = in_process(args, vlm, encoder)
        remote = server_gain(args, vlm, encoder, folder)
    for name, seconds in local.items():
        print(f"{name}: {seconds:.3f} s per {args.images} images in process ({args.side} px, "
              f"batch {args.batch_size}, {args.max_new_tokens} new tokens)")
    print(f"server, {args.clients} clients x {args.per_client} images at once: {remote['batched']:.3f} s batched, "
          f"{remote['one_request_per_call']:.3f} s one request per call: "
          f"{remote['one_request_per_call'] / remote['batched']:.2f}x from batching")
    return {"in_process": local, "server": remote}


if __name__ == "__main__":
    main(sys.argv[1:])
