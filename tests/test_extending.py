"""docs/extending.md's worked reward is real: its code blocks, written into a package, validate, score and train.

The blocks are read from the page (a fenced block right after `<!-- file: PATH -->`), so the page
cannot drift from code that works. `<!-- file: -->` marks the reward's own files, `<!-- package
file: -->` what an outside package writes once; the package's empty `__init__.py` files are made here.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf import OmegaConf
from test_training import TINY, only_run

from pcpo_hydra.config import validate
from pcpo_hydra.config.registry import group_schemas
from pcpo_hydra.config.hydra_setup import config_dir

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "extending.md"
_BLOCK = re.compile(r"^<!-- (?P<kind>file|package file): (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)^```", re.M | re.S)
SEARCHPATH = "hydra.searchpath=[pkg://mypkg.conf]"
REWARD_FILES = ["mypkg/brightness.py", "mypkg/schemas.py", "mypkg/conf/reward/brightness.yaml"]
SKELETON = ["mypkg/__init__.py", "mypkg/conf/__init__.py"]  # once per package, empty


def page_blocks(kind: str) -> dict[str, str]:
    """{path: code} of the page's blocks of one kind, in page order."""
    return {m["path"]: m["code"] for m in _BLOCK.finditer(PAGE.read_text()) if m["kind"] == kind}


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def write(root: Path, blocks: dict[str, str]) -> None:
    for path, code in blocks.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(code)


@pytest.fixture(scope="module")
def plugin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the package skeleton plus exactly the page's three reward blocks."""
    root = tmp_path_factory.mktemp("plugin")
    write(root, dict.fromkeys(SKELETON, ""))
    write(root, page_blocks("file"))
    return root


@pytest.fixture
def mypkg(plugin_root: Path, monkeypatch: pytest.MonkeyPatch):
    """The package importable in this process, and the registry and module table restored afterwards."""
    monkeypatch.syspath_prepend(str(plugin_root))
    monkeypatch.setitem(group_schemas(), "reward", dict(group_schemas()["reward"]))
    yield plugin_root
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]  # for good: monkeypatch would put them back, and the next test would not register


def env_with(*folders: Path, **variables: str) -> dict[str, str]:
    """This environment with `folders` first on PYTHONPATH (the worktree's own src stays behind them)."""
    path = os.pathsep.join([*map(str, folders), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **variables}


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=[SEARCHPATH, "reward=brightness", *overrides])


def test_adding_the_reward_is_exactly_three_files_and_the_core_never_names_it(plugin_root: Path) -> None:
    assert list(page_blocks("file")) == REWARD_FILES  # module, schema, one YAML
    assert files_under(plugin_root) == set(SKELETON) | set(REWARD_FILES)
    # the package and its configs stay outside: nothing shipped with pcpo-hydra knows the reward
    core = [p for folder in ("src/pcpo_hydra", "conf") for p in (ROOT / folder).rglob("*")
            if p.suffix in {".py", ".yaml"} and "brightness" in p.read_text().lower()]
    assert core == []


def test_a_composed_config_with_it_validates_without_importing_the_reward_module(mypkg: Path) -> None:
    cfg = validate(compose_with())
    assert OmegaConf.to_container(cfg.reward) == {"_target_": "mypkg.brightness.Brightness", "batch_size": 32,
                                                  "target": 1.0}
    assert "mypkg.schemas" in sys.modules and "mypkg.brightness" not in sys.modules


def test_the_pages_bad_value_fails_as_it_shows(plugin_root: Path, tmp_path: Path) -> None:
    """The page's `$ pcpo-train ... reward.target=1.5` and the one line it prints, exit status 2."""
    shown = re.search(r"^\$ pcpo-train (?P<args>.*)\n(?P<line>pcpo-train: .*)$", PAGE.read_text(), re.M)
    assert shown, "docs/extending.md lost its bad-value example"
    command = [sys.executable, "-m", "pcpo_hydra.train", *shlex.split(shown["args"])]
    result = subprocess.run(command, env=env_with(plugin_root), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert (result.returncode, result.stderr.strip()) == (2, shown["line"]), result.stderr[-3000:]


def known_images() -> torch.Tensor:
    """Black, white, pure red, a white left half on black, uniform 0.25 grey: 5 x [3, 4, 4]."""
    images = torch.zeros(5, 3, 4, 4)
    images[1] = 1.0
    images[2, 0] = 1.0
    images[3, :, :, :2] = 1.0
    images[4] = 0.25
    return images


@pytest.mark.parametrize(("target", "expected"), [
    (1.0, [0.0, 1.0, 0.2126, 0.5, 0.25]),               # the luma itself
    (0.5, [0.5, 0.5, 1 - 0.2874, 1.0, 0.75]),           # 1 - |luma - 0.5|
])
def test_it_scores_known_images_as_computed_by_hand(mypkg: Path, target: float, expected: list[float]) -> None:
    cfg = validate(compose_with(f"reward.target={target}", "reward.batch_size=2"))  # 2: three batches
    reward = instantiate(cfg.reward)
    scores = reward(known_images(), ["a prompt"] * 5)
    assert reward.name == "brightness" and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-6, rtol=0)


def test_a_searchpath_plugin_makes_the_command_line_flag_unneeded(plugin_root: Path, tmp_path: Path) -> None:
    # Hydra scans for plugins once per process: a fresh one sees the plugin the page shows.
    write(tmp_path, page_blocks("package file"))
    assert files_under(tmp_path) == {"hydra_plugins/mypkg_searchpath.py"}
    code = ("from hydra import compose, initialize_config_dir\nfrom pcpo_hydra.config.hydra_setup import config_dir\n"
            "with initialize_config_dir(config_dir=config_dir(), version_base='1.3'):\n"
            "    print(compose('train', ['reward=brightness']).reward._target_)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env_with(tmp_path, plugin_root),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "mypkg.brightness.Brightness"


def grid_tiles(grid_png: Path, count: int, side: int) -> torch.Tensor:
    """The `count` images of a logged sample grid as floats [count, 3, side, side] (8-bit values / 255).

    Tiles sit in about-square rows, each enlarged by a whole factor with nearest neighbour
    (pcpo_hydra.image_grid.make_grid), so every `scale`-th pixel of a tile is one image pixel.
    """
    from PIL import Image

    grid = torch.from_numpy(np.array(Image.open(grid_png).convert("RGB"))).permute(2, 0, 1)
    columns = math.ceil(math.sqrt(count))
    tile, cell_height = grid.shape[2] // columns, grid.shape[1] // math.ceil(count / columns)
    scale = tile // side
    tiles = []
    for i in range(count):
        top, left = (i // columns) * cell_height, (i % columns) * tile
        tiles.append(grid[:, top:top + tile:scale, left:left + tile:scale])
    return torch.stack(tiles).float() / 255


@pytest.mark.integration
def test_pcpo_train_trains_an_epoch_with_it_and_logs_its_images_brightness(plugin_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    env = env_with(plugin_root, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    command = [sys.executable, "-m", "pcpo_hydra.train", *TINY, SEARCHPATH, "reward=brightness",
               "log_images_every=1", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{store}")
    _, run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.tags["reward"] == "brightness"
    assert run.data.params["reward._target_"] == "mypkg.brightness.Brightness"
    logged = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"rollout/reward_{key}")]
              for key in ("mean", "min", "max", "nonfinite")}
    assert [step for step, _ in logged["mean"]] == [1] and logged["nonfinite"] == [(1, 0.0)]
    # The epoch's 8 images, from the grid it logged: their mean luma (target 1.0) is the reward logged.
    grid = Path(client.download_artifacts(run.info.run_id, "samples/epoch_00001.png", str(tmp_path)))
    luma = torch.einsum("bchw,c->b", grid_tiles(grid, 8, 32), torch.tensor([0.2126, 0.7152, 0.0722])) / 32**2
    pixel_rounding = 0.5 / 255  # the grid holds round(255 x) of each value
    for key, expected in (("mean", luma.mean()), ("min", luma.min()), ("max", luma.max())):
        assert abs(logged[key][0][1] - expected.item()) <= pixel_rounding, (key, logged[key], expected)
    assert luma.max() - luma.min() > 2 * pixel_rounding  # min and max tell the images apart
