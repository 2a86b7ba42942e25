"""Text embeddings cached per model and prompt, on disk or in memory, with hit and miss counts.

Training draws the same prompts epoch after epoch; encoding them once lets the text encoders
(SD3.5's T5-XXL alone is ~9 GB in bf16) leave the GPU for the whole run. Entries are one
safetensors file per prompt under `<directory>/<model fingerprint>/`, written atomically so
processes sharing the folder never read half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from pcpo_hydra.writes import written


class TextEmbeddingCache:
    """prompt -> {name: Tensor} for one model (`key`); `directory` None keeps entries in memory only."""

    def __init__(self, directory: Path | str | None, key: str) -> None:
        self.key = key
        self.folder = None if directory is None else Path(directory) / key
        self._memory: dict[str, dict[str, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, prompt: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.safetensors"

    def _load(self, prompt: str) -> dict[str, Tensor] | None:
        if self.folder is None:
            return self._memory.get(prompt)
        path = self._path(prompt)
        return load_file(path) if path.exists() else None

    def lookup(self, prompts: list[str]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
        """(entries found, distinct prompts missing); counts one hit or miss per distinct prompt."""
        found: dict[str, dict[str, Tensor]] = {}
        missing: list[str] = []
        for prompt in dict.fromkeys(prompts):
            entry = self._load(prompt)
            if entry is None:
                missing.append(prompt)
            else:
                found[prompt] = entry
        self.hits += len(found)
        self.misses += len(missing)
        return found, missing

    def store(self, prompt: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep one prompt's embeddings (copied to the CPU); returns what a later lookup returns."""
        entry = {name: t.detach().to("cpu").clone() for name, t in tensors.items()}
        if self.folder is None:
            self._memory[prompt] = entry
            return entry
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        try:
            with written(self._path(prompt), remove=False):  # a full disk: one line naming the entry
                save_file(entry, tmp, metadata={"prompt": prompt})
                os.replace(tmp, self._path(prompt))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return entry

    def take_counts(self) -> dict[str, float]:
        """Hits and misses since the last call (one epoch's, when the loop calls it per epoch)."""
        counts = {"hits": float(self.hits), "misses": float(self.misses)}
        self.hits = self.misses = 0
        return counts
