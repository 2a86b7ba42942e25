"""What of a network trains: LoRA adapters on a frozen base (peft), or every weight.

One `TrainableWeights` object per policy decides which parameters train, the dtype the network is
kept in, and what a checkpoint of the trained weights holds, so adapters never branch on it.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pcpo_hydra.models.schemas import LoraSchema

ADAPTER = "default"                      # the one peft adapter a policy trains
LORA_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name: the folder loads with from_pretrained


def lora_settings(value: LoraSchema | Mapping[str, Any] | None) -> LoraSchema | None:
    """The `model.lora` node as its schema; None (or enabled: false) means full fine-tuning.

    The config arrives validated; a direct caller (a test, a script) gets its unknown or missing
    keys named here, since the schema carries no defaults to fill them.
    """
    if value is None or isinstance(value, LoraSchema):
        settings = value
    else:
        known = [f.name for f in fields(LoraSchema)]
        unknown, missing = sorted(set(value) - set(known)), [k for k in known if k not in value]
        if unknown or missing:
            raise ValueError(f"model.lora: unknown key(s) {unknown}, missing key(s) {missing}; known: {known}")
        settings = LoraSchema(**value)
    return settings if settings is not None and settings.enabled else None


def place_module(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)` without diffusers' spurious warning.

    diffusers' `ModelMixin.to` warns about float32-only modules on every dtype cast, even when the
    class has none; such classes take torch's own `to`, the others keep diffusers' (which honours them).
    """
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(device, dtype=dtype)
    else:
        nn.Module.to(module, device=device, dtype=dtype)


class TrainableWeights(ABC):
    """Which weights of a network train, the dtype it lives in, and how they are saved."""

    @abstractmethod
    def attach(self, network: nn.Module) -> None:
        """Set requires_grad (and add adapters) once, right after the network is built."""

    @abstractmethod
    def network_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """dtype of the network's weights when frozen weights use `weight_dtype`."""

    @abstractmethod
    def save(self, network: nn.Module, directory: Path) -> None:
        """Write the trained weights (only those) into `directory`."""

    @abstractmethod
    def load(self, network: nn.Module, directory: Path) -> None:
        """Copy weights written by `save` into the network in place (optimizer references survive)."""

    @abstractmethod
    def keep_reference(self, network: nn.Module, weight_dtype: torch.dtype) -> None:
        """Remember the policy as it is now, so `reference` can reproduce it after training moves it."""

    @abstractmethod
    def reference(self, network: nn.Module) -> AbstractContextManager[nn.Module]:
        """Context yielding a module that computes the reference policy (the KL penalty's anchor)."""

    def parameters(self, network: nn.Module) -> list[nn.Parameter]:
        return [p for p in network.parameters() if p.requires_grad]

    def place(self, network: nn.Module, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move the network; trained weights stay float32 so small updates are not rounded away."""
        place_module(network, device, self.network_dtype(weight_dtype))
        for p in self.parameters(network):
            p.data = p.data.float()


class FullWeights(TrainableWeights):
    """Every weight trains; saved as a diffusers model folder (config + one safetensors file)."""

    def __init__(self) -> None:
        self._frozen: nn.Module | None = None

    def attach(self, network: nn.Module) -> None:
        network.requires_grad_(True)

    def keep_reference(self, network: nn.Module, weight_dtype: torch.dtype) -> None:
        """A frozen copy of the whole network, in the frozen weights' dtype (a second network's memory)."""
        frozen = copy.deepcopy(network).requires_grad_(False).eval()
        place_module(frozen, next(network.parameters()).device, weight_dtype)
        self._frozen = frozen

    @contextmanager
    def reference(self, network: nn.Module) -> Iterator[nn.Module]:
        if self._frozen is None:
            raise RuntimeError("the reference policy needs keep_reference() first (done when algorithm.kl_beta > 0)")
        yield self._frozen

    def network_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def save(self, network: nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(network.state_dict(), directory / FULL_WEIGHTS)
        network.save_config(directory)

    def load(self, network: nn.Module, directory: Path) -> None:
        network.load_state_dict(load_file(directory / FULL_WEIGHTS), strict=True)


class LoraWeights(TrainableWeights):
    """peft LoRA adapters on a frozen base; saved as the adapter's safetensors and adapter_config.json."""

    def __init__(self, settings: LoraSchema) -> None:
        self.settings = settings

    def attach(self, network: nn.Module) -> None:
        from peft import LoraConfig

        network.requires_grad_(False)
        network.add_adapter(
            LoraConfig(
                r=self.settings.rank,
                lora_alpha=self.settings.alpha,
                init_lora_weights="gaussian",  # B = 0: the adapted network starts equal to its base
                target_modules=list(self.settings.target_modules),
            ),
            adapter_name=ADAPTER,
        )

    def network_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype

    def keep_reference(self, network: nn.Module, weight_dtype: torch.dtype) -> None:
        """Nothing to keep: the base under the adapters is the initial policy (B = 0 at init)."""

    @contextmanager
    def reference(self, network: nn.Module) -> Iterator[nn.Module]:
        """The network with its adapters switched off, switched back on however the block exits."""
        network.disable_adapters()
        try:
            yield network
        finally:
            network.enable_adapters()

    def save(self, network: nn.Module, directory: Path) -> None:
        from peft.utils import get_peft_model_state_dict

        directory.mkdir(parents=True, exist_ok=True)
        save_file(get_peft_model_state_dict(network, adapter_name=ADAPTER), directory / LORA_WEIGHTS)
        network.peft_config[ADAPTER].save_pretrained(str(directory))

    def load(self, network: nn.Module, directory: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(network, load_file(directory / LORA_WEIGHTS), adapter_name=ADAPTER)
        missing = [k for k in result.missing_keys if f".{ADAPTER}." in k and "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"LoRA weights in {directory} do not match model.lora (rank, target_modules): "
                f"{len(missing)} adapter weights missing, {len(result.unexpected_keys)} unexpected, "
                f"e.g. {(missing + list(result.unexpected_keys))[:3]}"
            )


def trainable_weights(lora: LoraSchema | Mapping[str, Any] | None) -> TrainableWeights:
    """LoRA when `lora` is enabled, else full fine-tuning."""
    settings = lora_settings(lora)
    return FullWeights() if settings is None else LoraWeights(settings)
