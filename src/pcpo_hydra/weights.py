"""`from_pretrained` with one clear error for every way a component can be missing.

Shared by the model adapters and the rewards (both load pretrained weights), so it sits beside them
rather than inside either package.

A library's own failure (no network, HF_HUB_OFFLINE with an empty cache, a typo in a path) surfaces
deep in its download code, or not at all: transformers 5 returns an empty tokenizer when it finds
no files. Users need the model id, the component and the override that fixes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelLoadError(RuntimeError):
    """Pretrained weights could not be found locally or fetched from the hub."""


def looks_like_path(pretrained: str) -> bool:
    """True for anything the hub would reject as a repo id (absolute, relative or home paths)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:
        return True
    try:
        validate_repo_id(pretrained)
    except HFValidationError:
        return True
    return False


@dataclass(frozen=True)
class WeightsFor:
    """Who needs the weights, for the error: its name, the config key to fix, what a local copy holds."""

    kind: str
    key: str
    layout: str


SD_PIPELINE = WeightsFor(
    "model", "model.pretrained",
    "a pipeline folder saved with save_pretrained, holding unet/ vae/ text_encoder/ tokenizer/ scheduler/",
)


def load_error(
    pretrained: str, component: str | None, revision: str | None, reason: str, owner: WeightsFor = SD_PIPELINE,
    fix: str | None = None,
) -> ModelLoadError:
    """The error users see: what failed, why in one line, and the override that fixes it.

    `fix` replaces the default advice (point the key at a local copy), for files that exist but are wrong.
    """
    from huggingface_hub import is_offline_mode

    what = f"the {component} of {owner.kind}" if component else owner.kind
    source = repr(pretrained) + (f" (revision {revision!r})" if revision else "")
    hub = not looks_like_path(pretrained)
    offline = ""
    if hub and is_offline_mode():
        offline = "HF_HUB_OFFLINE is set and the files are not in the local cache. "
    if fix is not None:
        return ModelLoadError(f"Cannot load {what} {source}. Reason: {reason.rstrip('.')}. Fix: {fix.rstrip('.')}.")
    fix = f"Fix: set {owner.key}=<local path> ({owner.layout})"
    if hub:
        fix += (
            f", or make the Hugging Face Hub reachable (unset HF_HUB_OFFLINE) / pre-download it with "
            f"`hf download {pretrained}` (older huggingface_hub: `huggingface-cli download {pretrained}`)"
        )
    return ModelLoadError(f"Cannot load {what} {source}. {offline}Reason: {reason.rstrip('.')}. {fix}.")


def _first_line(error: BaseException) -> str:
    """The library's own reason, short enough to read inside our message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


def host_unreachable(url: str, timeout_s: float = 3.0) -> str | None:
    """Why the host of `url` takes no TCP connection within `timeout_s` ("host:port is unreachable (...)"),
    or None if it does.

    Without this, a machine with no route to a download host waits through the library's retries for
    each file before the same error. Behind an HTTP(S) proxy a direct connection proves nothing: no probe.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    parsed = urlparse(url)
    address = (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=timeout_s).close()
    except OSError as error:
        return f"{address[0]}:{address[1]} is unreachable ({error})"
    return None


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub endpoint takes no TCP connection within `timeout_s`, or None if it does."""
    from huggingface_hub import constants

    reason = host_unreachable(constants.ENDPOINT, timeout_s)
    return f"the hub at {reason} and nothing of it is in the local cache" if reason else None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether any file of the repo was downloaded before (the libraries then fall back to the cache)."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


def check_source(pretrained: str, revision: str | None = None, owner: WeightsFor = SD_PIPELINE) -> None:
    """Fail before any download when `pretrained` names a missing local folder, or an uncached hub
    repo while the hub is unreachable."""
    from huggingface_hub import is_offline_mode

    local = Path(pretrained).expanduser()
    if local.exists():
        return
    if looks_like_path(pretrained):
        reason = f"no such local directory {str(local)!r}, and not a hub id"
        raise load_error(pretrained, None, revision, reason, owner)
    if not is_offline_mode() and not _in_hub_cache(pretrained):
        reason = hub_unreachable()
        if reason:
            raise load_error(pretrained, None, revision, reason, owner)


# Keys a checkpoint may lack or carry beyond the model, each with why that loses nothing. The
# libraries already pass over non-persistent buffers and tied copies; these are the rest.
OPTIONAL_KEYS: dict[str, str] = {
    r"(^|\.)position_ids$": "a buffer of arange(max positions) that the model rebuilds; older transformers saved it",
}
KEYS_SHOWN = 4  # keys quoted per kind of mismatch: enough to recognise the pattern, one line still


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:KEYS_SHOWN])
    return shown + (f" and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else "")


def key_mismatch(missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[str] = ()) -> str | None:
    """Why a state dict does not fill a model exactly (None when it does), keys in OPTIONAL_KEYS left out.

    `mismatched` holds already-worded entries ("key (file shape) vs (model shape)").
    """

    def required(keys: Iterable[str]) -> list[str]:
        return sorted(key for key in keys if not any(re.search(pattern, key) for pattern in OPTIONAL_KEYS))

    problems = [f"{label} {_listed(keys)}" for label, keys in (
        ("missing", required(missing)), ("unexpected", required(unexpected)), ("shapes differ for", sorted(mismatched)),
    ) if keys]
    return "; ".join(problems) or None


def _weight_files(folder: Path) -> str:
    """The weight file of a loaded component, for the error; the folder when it has shards or none."""
    files = sorted(path for path in folder.glob("*") if path.suffix in (".safetensors", ".bin"))
    return str(files[0]) if len(files) == 1 else str(folder)


def _loading_info_error(info: Mapping[str, Any]) -> str | None:
    """transformers' and diffusers' output_loading_info, as key_mismatch words it."""
    mismatched = [f"{key} {tuple(file_shape)} in the file vs {tuple(model_shape)} in the model"
                  for key, file_shape, model_shape in info.get("mismatched_keys") or ()]
    return key_mismatch(info.get("missing_keys") or (), info.get("unexpected_keys") or (), mismatched)


# diffusers raises (not reports) a shape mismatch, advising a random-initialising reload; its key and shapes are kept.
DIFFUSERS_SHAPE = re.compile(r"because (\S+) expected shape (.+?), but got (.+?)\. ")


def _shape(text: str) -> tuple[int, ...]:
    """`torch.Size([33, 32])` as (33, 32), as the other mismatch entries print shapes."""
    return tuple(int(size) for size in re.findall(r"\d+", text))


def load_component(
    loader: Any, pretrained: str, subfolder: str, revision: str | None = None, owner: WeightsFor = SD_PIPELINE
) -> Any:
    """`loader.from_pretrained(pretrained, subfolder=...)`, re-raised as ModelLoadError on failure.

    subfolder "" loads from the folder itself (a single-model checkpoint such as CLIP's). A model
    (an nn.Module class) must find exactly its weights in the files: transformers and diffusers
    only warn on missing keys and initialise them at random, so their loading info is checked here.
    """
    import torch

    local = Path(pretrained).expanduser()
    if local.is_dir() and not (local / subfolder).is_dir():
        raise load_error(pretrained, subfolder, revision, f"the local folder has no {subfolder}/ subfolder", owner)
    source = str(local) if local.is_dir() else pretrained
    weights = isinstance(loader, type) and issubclass(loader, torch.nn.Module)
    options: dict[str, Any] = {"output_loading_info": True} if weights else {}
    if weights and loader.__module__.startswith("transformers."):
        # Report shape mismatches in the loading info (checked below) instead of raising a bare RuntimeError.
        options["ignore_mismatched_sizes"] = True

    def misfit(reason: str) -> ModelLoadError:
        file = _weight_files(local / subfolder) if local.is_dir() else "/".join(filter(None, (pretrained, subfolder)))
        return load_error(
            file, f"{subfolder or 'weights'} ({loader.__name__})", revision, f"its weights do not fit the model: {reason}",
            owner, fix=f"point {owner.key} at a complete checkpoint of this architecture (download it again, or re-save it)",
        )

    try:
        loaded = loader.from_pretrained(source, subfolder=subfolder, revision=revision, **options)
    except (OSError, ValueError) as error:
        shape = DIFFUSERS_SHAPE.search(str(error))
        if shape:
            key, model_shape, file_shape = shape.groups()
            raise misfit(key_mismatch((), (), [f"{key} {_shape(file_shape)} in the file vs {_shape(model_shape)} "
                                                   "in the model"])) from None
        # The reason line carries the library's message; its deep traceback helps no one.
        raise load_error(pretrained, subfolder or None, revision, _first_line(error), owner) from None
    if weights:
        loaded, info = loaded
        reason = _loading_info_error(info)
        if reason:
            raise misfit(reason)
    # transformers 5 returns an empty tokenizer, not an error, when it finds no vocabulary files.
    specials = getattr(loaded, "all_special_tokens", None)
    if specials is not None and len(loaded) <= len(specials):
        raise load_error(pretrained, subfolder or "tokenizer", revision, "no vocabulary found in its files", owner)
    return loaded


def _download(url: str, owner: WeightsFor) -> Path:
    """An https file, downloaded once into torch's hub cache (where DDPO-style code keeps its files)."""
    from urllib.parse import unquote, urlparse

    import torch

    target = Path(torch.hub.get_dir()) / "pcpo_hydra" / unquote(Path(urlparse(url).path).name)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except OSError as error:  # URLError and HTTPError are OSErrors
            raise load_error(url, None, None, str(error).splitlines()[0], owner) from None
    return target


def weight_file(source: str, owner: WeightsFor) -> Path:
    """A single weight file: a local path as given, an https URL (cached), or `<user>/<repo>/<file>` on the hub."""
    local = Path(source).expanduser()
    if local.is_file():
        return local
    if source.startswith(("https://", "http://")):
        return _download(source, owner)
    if source.startswith(("/", ".", "~")):
        raise load_error(source, None, None, f"no such file {str(local)!r}", owner)
    parts = source.split("/")
    if len(parts) < 3:
        raise load_error(source, None, None, "neither a local file, an https URL nor <user>/<repo>/<file> on the hub", owner)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename))
    except (OSError, ValueError, HfHubHTTPError) as error:  # named by its repo, so the hint says how to fetch it
        raise load_error(repo, filename, None, str(error).splitlines()[0], owner) from None


def read_state_dict(path: Path, source: str, owner: WeightsFor, nested: str | None = None) -> dict:
    """The tensors in a .safetensors or torch file, loaded without running pickled code.

    `nested` names the key a training checkpoint keeps its state dict under, when it has one.
    Any file that is not a state dict of tensors is a ModelLoadError naming `source`.
    """
    import pickle

    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        # The library's message is about pickling policy; what the user needs is which file is bad.
        reason = f"not a torch checkpoint of plain tensors ({type(error).__name__}: {_first_line(error)})"
        raise load_error(source, None, None, reason, owner) from None
    if nested is not None and isinstance(state, dict):
        state = state.get(nested, state)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise load_error(source, None, None, "holds no state dict of tensors", owner)
    return state
