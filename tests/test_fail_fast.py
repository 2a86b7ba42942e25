"""Every bad input or missing piece of the machine fails fast: exit 2, one line naming the key, the value and the fix.

Most tests run the real `pcpo-train` command and bound its time to fail generously (CI is loaded);
the times measured on a 2-core machine are in docs/running.md's Validation table.
"""

from __future__ import annotations

import http.server
import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pcpo_hydra import preflight as preflight_module
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.needs import Executable, PythonModule
from pcpo_hydra.rewards.health import server_problem

FAST_S = 10  # generous bound on the time to fail of a check that needs nothing heavy
FIX = "give a UTF-8 text file with one prompt per line"


def pcpo_train(cwd: Path, *args: str, python_prelude: str = "") -> tuple[subprocess.CompletedProcess, float]:
    """`pcpo-train args` in `cwd` with no tracking URI from the environment; (result, seconds it took).

    With `python_prelude` the command's main() is run under `python -c` after that code instead, and
    the heavy modules it imported are printed last ("HEAVY: [...]").
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")}
    script = Path(sys.executable).with_name("pcpo-train")
    if python_prelude or not script.exists():
        code = (f"{python_prelude}\nimport sys\nsys.argv = ['pcpo-train', *{list(args)!r}]\n"
                "from pcpo_hydra.train import main\ntry:\n    main()\nfinally:\n"
                "    print('HEAVY:', sorted(m for m in ('torch', 'mlflow', 'diffusers') if m in sys.modules))\n")
        command = [sys.executable, "-c", code]
    else:
        command = [str(script), *args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - started


def assert_one_line(result: subprocess.CompletedProcess, *expected: str, code: int = 2) -> str:
    """The command exited with `code`, no traceback, its one message line last, holding every `expected` text.

    A config error (2) is all the command says; a run that failed (1) may have drawn progress bars first.
    """
    assert result.returncode == code, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1].startswith("pcpo-train: "), result.stderr[-3000:]
    assert len(lines) == 1 or code != 2, result.stderr[-3000:]
    assert sum(line.startswith("pcpo-train: ") for line in lines) == 1
    for text in expected:
        assert text in lines[-1]
    return lines[-1]


# ------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_refuses_fails_at_validation(tmp_path: Path, seed: str) -> None:
    result, elapsed = pcpo_train(tmp_path, f"seed={seed}")
    assert_one_line(result, f"invalid configuration: seed={seed}: must be a number in [0, 4294967295]")
    assert elapsed < FAST_S


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["algorithm.clip_rnge=0.1"], "algorithm.clip_rnge: no such key; did you mean algorithm.clip_range?"),
        (["-m", "algorithm.clip_rnge=0.1,0.2"], "algorithm.clip_rnge: no such key; did you mean algorithm.clip_range?"),
        (["algo.clip_range=0.1"], "algo.clip_range: no such key; did you mean algorithm.clip_range?"),
        (["model.lora.rnk=8"], "model.lora.rnk: no such key; did you mean model.lora.rank?"),
        (["--cfg", "job", "rollout.grop_size=4"], "rollout.grop_size: no such key; did you mean rollout.group_size?"),
    ],
)
def test_a_misspelt_key_gets_a_did_you_mean_before_hydra_suggests_adding_it(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result, elapsed = pcpo_train(tmp_path, *args)
    line = assert_one_line(result, expected)
    assert "+" not in line and elapsed < FAST_S


def test_all_misspelt_keys_are_named_at_once(tmp_path: Path) -> None:
    result, _ = pcpo_train(tmp_path, "train.batch_sise=2", "optim.lr=1e-3", "optim.betaz=[0.9,0.99]")
    assert result.returncode == 2
    assert "train.batch_sise: no such key; did you mean train.batch_size?" in result.stderr
    assert "optim.betaz: no such key; did you mean optim.betas?" in result.stderr
    assert "2 problem(s)" in result.stderr


def test_a_key_added_with_plus_that_the_schema_lacks_gets_a_did_you_mean_too(compose_cfg) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("+model.lora.rnk=8"))
    assert str(info.value) == ("invalid configuration: model.lora.rnk: Key 'rnk' not in 'LoraSchema'; did you mean "
                               "model.lora.rank? (allowed keys: enabled, rank, alpha, target_modules)")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b"  \n\t\n\n", "holds only whitespace, no prompt"),
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "is binary (a NUL byte at offset 8)"),
        ("caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ],
)
def test_a_prompt_file_that_gives_no_prompts_fails_at_validation_naming_it(
    compose_cfg, tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("prompts=file", f"prompts.path={path}"))
    assert str(info.value) == f"invalid configuration: prompts.path={str(path)!r}: {problem}; {FIX}"


def test_a_binary_prompt_file_is_named_by_the_cli_without_dumping_it_or_building_anything(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    result, elapsed = pcpo_train(tmp_path, "prompts=file", f"prompts.path={path}", python_prelude="pass")
    assert_one_line(result, f"prompts.path={str(path)!r}: is binary (a NUL byte at offset 8)", FIX)
    assert "\\x" not in result.stderr and "HEAVY: []" in result.stdout and elapsed < FAST_S


# ------------------------------------------------------------------------ what components need


def test_reward_ocr_without_pytesseract_names_the_extra(tmp_path: Path) -> None:
    blocked = "import sys; sys.modules['pytesseract'] = None  # as if the ocr extra were not installed"
    result, elapsed = pcpo_train(tmp_path, "reward=ocr", python_prelude=blocked)
    assert result.returncode == 2, result.stderr
    assert ("reward (pcpo_hydra.rewards.ocr.OcrReward) needs the Python module pytesseract; "
            "fix: pip install 'pcpo-hydra[ocr]'") in result.stderr
    assert "HEAVY: []" in result.stdout and elapsed < FAST_S


def test_reward_ocr_without_the_tesseract_binary_names_the_package(tmp_path: Path) -> None:
    pytest.importorskip("pytesseract", reason="pip install 'pcpo-hydra[ocr]'")  # else its module is a second problem
    result, elapsed = pcpo_train(tmp_path, "reward=ocr", "reward.tesseract_cmd=/nonexistent/tesseract")
    assert_one_line(result, "reward (pcpo_hydra.rewards.ocr.OcrReward) needs the executable '/nonexistent/tesseract'",
                    "fix: apt-get install tesseract-ocr tesseract-ocr-eng",
                    "or set reward.tesseract_cmd=<path to tesseract>")
    assert elapsed < FAST_S


def test_needs_are_read_from_the_node_without_importing_anything() -> None:
    node = OmegaConf.create({"_target_": "outside.Reward", "cmd": None})
    assert PythonModule("json", "-").problem(node, "reward") is None
    assert PythonModule("no_such_module_pcpo", "pip install it").problem(node, "reward.components.a") == (
        "reward.components.a (outside.Reward) needs the Python module no_such_module_pcpo; fix: pip install it")
    assert Executable("cmd", "sh", "-").problem(node, "reward") is None
    assert "needs the executable 'no-such-tool-pcpo'" in Executable("cmd", "no-such-tool-pcpo", "-").problem(node, "reward")


def test_a_multi_rewards_components_are_checked_for_their_needs(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=multi", "+reward@reward.components.text=ocr", "+reward.weights.text=1.0",
                               "reward.components.text.tesseract_cmd=/nonexistent/t"))
    keys = [key for key, _, _ in preflight_module.component_nodes(cfg)]
    assert "reward.components.text" in keys
    with pytest.raises(ConfigError, match=r"reward\.components\.text \(pcpo_hydra\.rewards\.ocr\.OcrReward\) needs"):
        preflight_module.preflight(cfg, Path("unused"))


def closed_port_url() -> str:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # nobody listens there once closed


def test_a_dead_reward_server_fails_before_the_model_is_built(tmp_path: Path) -> None:
    url = closed_port_url()
    result, elapsed = pcpo_train(tmp_path, "reward=remote", f"reward.url={url}", "reward.health_wait_s=1")
    assert_one_line(result, f"reward.url={url!r}: no reward server answers GET {url}/health within 1 s",
                    "Connection refused", "fix: start pcpo-reward-server there, or set reward.url",
                    "reward.health_wait_s=1 s")
    assert 1 <= elapsed < FAST_S


@pytest.fixture
def http_answer(request) -> Iterator[str]:
    """A loopback HTTP server answering every GET with (status, body) = request.param."""
    status, body = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("http_answer", "problem"),
    [
        ((200, json.dumps({"reward": "jpeg", "ready": True}).encode()), None),
        ((404, b"nothing here"), "answered 404 Not Found: not a pcpo-reward-server"),
        ((200, b"<html>mlflow</html>"), "answered, but not as a pcpo-reward-server"),
    ],
    indirect=["http_answer"],
)
def test_the_health_probe_tells_a_reward_server_from_anything_else(http_answer: str, problem: str | None) -> None:
    found = server_problem(http_answer, 1.0)
    assert found is None if problem is None else problem in found


def test_the_remote_reward_asks_again_when_it_is_built() -> None:
    from pcpo_hydra.rewards.remote import RemoteReward
    from pcpo_hydra.weights import ModelLoadError

    url = closed_port_url()
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=rf"reward.url='{url}': no reward server answers .* within 0.5 s"):
        RemoteReward(url, health_wait_s=0.5)
    assert 0.5 <= time.monotonic() - started < 3


# --------------------------------------------------------------------------------- devices


def test_a_cuda_hardware_on_a_machine_without_gpus_fails_before_spawning(tmp_path: Path) -> None:
    if preflight_module.glob("/dev/nvidia[0-9]*"):
        pytest.skip("this machine has NVIDIA devices")
    for hardware in ("gpu1", "node8_zero2"):
        result, elapsed = pcpo_train(tmp_path, f"hardware={hardware}", python_prelude="pass")
        assert_one_line(result, "hardware.device='cuda': this machine has no NVIDIA GPU (no /dev/nvidia*); "
                                "use hardware=cpu (hardware=cpu2_zero2: two ranks on CPU)")
        assert "HEAVY: []" in result.stdout and elapsed < FAST_S


def test_more_ranks_than_gpus_or_a_torch_without_cuda_is_named(compose_cfg, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(preflight_module, "glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    hardware = validate(compose_cfg("hardware=node8_zero2")).hardware
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert preflight_module.device_problems(hardware) == [
        "hardware.processes_per_node=8: one rank per GPU, but 1 CUDA device(s) are visible; "
        "set hardware.processes_per_node=1 (or hardware=gpu1)"]
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun each rank needs one GPU only
    assert preflight_module.device_problems(hardware) == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    (problem,) = preflight_module.device_problems(hardware)
    assert f"torch {torch.__version__}" in problem and "sees no CUDA device" in problem and "use hardware=cpu" in problem


# ------------------------------------------------------------------------- folders and stores


def test_unwritable_output_checkpoint_and_text_cache_folders_fail_before_the_model(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").parent.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    cases = {
        f"hydra.run.dir={blocker}/run": f"hydra.run.dir='{blocker}/run': cannot write there (not a folder: {blocker}); "
                                        "fix: run pcpo-train from a writable folder, or set hydra.run.dir=",
        f"hydra.sweep.dir={blocker}/sweep": f"hydra.sweep.dir='{blocker}/sweep': cannot write there",
        f"hydra.run.dir={run_dir}": f"hydra.run.dir='{run_dir}': cannot write its checkpoints/ (not a folder: "
                                    f"{run_dir / 'checkpoints'}); fix: set hydra.run.dir=<writable folder>",
        f"text_cache_dir={blocker}/cache": f"text_cache_dir='{blocker}/cache': cannot write there (not a folder: "
                                           f"{blocker}); fix: set text_cache_dir=<writable folder>, or text_cache_dir=null",
    }
    for override, expected in cases.items():
        args = ["-m", override, "seed=1,2"] if "sweep" in override else [override]
        result, elapsed = pcpo_train(tmp_path, *args)
        assert_one_line(result, expected)
        assert elapsed < FAST_S


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_folder_without_write_permission_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result, _ = pcpo_train(tmp_path, f"text_cache_dir={locked}/cache")
    assert_one_line(result, f"text_cache_dir='{locked}/cache': cannot write there (Permission denied: {locked})")


def test_a_corrupt_or_unwritable_mlflow_store_is_named_with_the_fix(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is no database" * 100)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = {
        corrupt: f"the store {corrupt} is not an SQLite database (corrupt?); move it aside, or set "
                 "logger.tracking_uri=sqlite:///<writable folder>/mlflow.db",
        blocker / "mlflow.db": f"cannot create the store {blocker / 'mlflow.db'} (not a folder: {blocker})",
    }
    for store, expected in cases.items():
        result, elapsed = pcpo_train(tmp_path, f"logger.tracking_uri=sqlite:///{store}", python_prelude="pass")
        assert_one_line(result, f"logger.tracking_uri='sqlite:///{store}': {expected}")
        assert "HEAVY: []" in result.stdout and elapsed < FAST_S


def test_a_store_another_process_keeps_locked_fails_within_the_lock_wait(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    holder = sqlite3.connect(store)
    holder.execute("CREATE TABLE t (x)")
    holder.commit()
    holder.execute("BEGIN EXCLUSIVE")  # held by this process while pcpo-train starts
    try:
        result, elapsed = pcpo_train(tmp_path, f"logger.tracking_uri=sqlite:///{store}")
    finally:
        holder.rollback()
        holder.close()
    assert_one_line(result, f"the store {store} stayed locked by another process for 2 s",
                    f"fuser {store}", "logger=mlflow_server")
    assert 2 <= elapsed < FAST_S


def test_a_tracking_server_that_is_down_is_named_at_once(tmp_path: Path) -> None:
    url = closed_port_url()
    result, elapsed = pcpo_train(tmp_path, f"logger.tracking_uri={url}")
    assert_one_line(result, f"logger.tracking_uri={url!r}: no MLflow tracking server answers at {url}",
                    "launchers/mlflow_server.sh start")
    assert elapsed < FAST_S


def test_a_file_store_the_user_names_is_opened_without_mlflows_opt_in(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from pcpo_hydra.tracking import MLflowTracker

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    tracker = MLflowTracker(uri, "tests")
    run_id = tracker.start(None, {"a": 1}, {})
    tracker.log_metrics({"m": 1.0}, step=3)
    tracker.end()
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"


def test_the_checks_before_hydra_and_after_validation_import_nothing_heavy(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result, _ = pcpo_train(tmp_path, f"text_cache_dir={blocker}/cache", "algorithm.clip_rnge=1",
                           python_prelude="pass")
    assert result.returncode == 2 and "HEAVY: []" in result.stdout
    result, _ = pcpo_train(tmp_path, f"text_cache_dir={blocker}/cache", python_prelude="pass")
    assert result.returncode == 2 and "HEAVY: []" in result.stdout


# ------------------------------------------------------------------------------ failed writes


def limited(size: int):
    """preexec_fn: files of this process tree end at `size` bytes (Python ignores SIGXFSZ: a write raises EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def run_limited(code: str, size: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=limited(size))


def test_a_text_cache_entry_that_cannot_be_written_is_named_and_leaves_no_file(tmp_path: Path) -> None:
    code = (
        "import torch\nfrom pcpo_hydra.models.text_cache import TextEmbeddingCache\n"
        f"cache = TextEmbeddingCache({str(tmp_path)!r}, 'model')\n"
        "try:\n    cache.store('a cat', {'embeds': torch.zeros(4096)})\n"
        "except OSError as error:\n    print(error)\n"
    )
    result = run_limited(code, 4096)
    assert result.returncode == 0, result.stderr
    entry = next((tmp_path / "model").iterdir(), None) if (tmp_path / "model").exists() else None
    assert entry is None  # neither the entry nor its temporary file
    assert result.stdout.startswith(f"cannot write {tmp_path / 'model'}/")
    assert "File too large (the file-size limit, ulimit -f, is 4096 bytes)" in result.stdout


def test_an_mlflow_store_that_cannot_grow_is_named(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    code = (
        "from pcpo_hydra.tracking import MLflowTracker\n"
        f"try:\n    MLflowTracker('sqlite:///{store}', 'tests')\n"
        "except OSError as error:\n    print(error)\n"
    )
    result = run_limited(code, 200_000)  # a new store's tables take about 1 MB
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(f"cannot write {store}: File too large (the file-size limit, ulimit -f")


@pytest.mark.integration
def test_a_checkpoint_that_hits_the_file_size_limit_ends_the_run_in_one_line_keeping_the_last(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    common = ["experiment=debug", f"hydra.run.dir={run_dir}", f"logger.tracking_uri=sqlite:///{store}",
              "hardware.num_threads=1"]
    first, _ = pcpo_train(tmp_path, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    good = run_dir / "checkpoints" / "epoch_00001"
    before = {path.relative_to(good): path.read_bytes() for path in good.rglob("*") if path.is_file()}
    # The tiny model's optimizer state (about 2.4 MB) is over the limit; its weights and the store are under.
    started = time.monotonic()
    second = subprocess.run([str(Path(sys.executable).with_name("pcpo-train")), *common, f"resume={run_dir}",
                             "epochs=2"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            preexec_fn=limited(1_500_000))
    elapsed = time.monotonic() - started
    partial = run_dir / "checkpoints" / ".partial_epoch_00002"
    assert_one_line(second, f"pcpo-train: cannot write {partial}: File too large (the file-size limit, ulimit -f, "
                            "is 1500000 bytes) (removed)", f"`pcpo-train resume={run_dir}` continues from epoch_00001",
                    code=1)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_00001"]
    assert {path.relative_to(good): path.read_bytes() for path in good.rglob("*") if path.is_file()} == before
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("pcpo-hydra").experiment_id])
    assert run.info.status == "FAILED"
    assert elapsed < 300


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs mount rights: root in CI's container; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_named_as_such_and_leaves_no_partial_entry(tiny_disk: Path) -> None:
    import torch

    from pcpo_hydra.models.text_cache import TextEmbeddingCache
    from pcpo_hydra.writes import WriteFailed

    cache = TextEmbeddingCache(tiny_disk, "model")
    with pytest.raises(WriteFailed) as info:
        cache.store("a cat", {"embeds": torch.zeros(64 * 1024)})  # 256 KiB on a 64 KiB disk
    assert str(info.value).startswith(f"cannot write {tiny_disk / 'model'}/")
    assert "No space left on device (free some space on that disk)" in str(info.value)
    assert list((tiny_disk / "model").iterdir()) == []
