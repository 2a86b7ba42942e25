"""Implicit Reward Guidance: one network output mixed from the base model and fine-tuned policies.

    f = f_base + sum_k w_k (f_k - f_base) = (1 - sum_k w_k) f_base + sum_k w_k f_k

Each f is a guided prediction (`PolicyModel.predict`: classifier-free guidance inside), so CFG
composes with the mixture, and the sampler steps the mixed f as it would any network output: the
same f gives the x0 estimate and the renoising direction. The second form is the one evaluated:
a term whose coefficient is 0 is not computed at all, so w = 0 is the base model's output and a
single policy at w = 1 is that policy's, bit for bit, rather than up to rounding.

LoRA policies share the base network: each is loaded as a named peft adapter and switched on for
its own call (the base is the network with adapters disabled). A full fine-tune holds every
weight, so it gets its own copy of the network.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pcpo_hydra.models.base import PolicyModel
from pcpo_hydra.models.trainable import FULL_WEIGHTS, LORA_WEIGHTS

NetworkFor = Callable[[], AbstractContextManager[nn.Module]]  # enters a state in which the module computes a policy


class PolicyLoadError(ValueError):
    """A policy folder that does not fit the base model; the message names the policy and the folder."""


def _has_adapters(network: nn.Module) -> bool:
    return bool(getattr(network, "peft_config", None))


@contextmanager
def _base(network: nn.Module) -> Iterator[nn.Module]:
    """The network as the base model: any adapters (the model's own, the policies') switched off."""
    if _has_adapters(network):
        network.disable_adapters()
    yield network


@contextmanager
def _adapter(network: nn.Module, name: str) -> Iterator[nn.Module]:
    """The network with only adapter `name` active."""
    network.enable_adapters()
    network.set_adapter(name)
    yield network


@contextmanager
def _own(network: nn.Module) -> Iterator[nn.Module]:
    yield network


def _attach_lora(network: nn.Module, name: str, folder: Path) -> NetworkFor:
    """Add the adapter saved in `folder` to the shared network under `name`."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    with warnings.catch_warnings():  # several adapters on one network is the point here, not a slip
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        network.add_adapter(LoraConfig.from_pretrained(str(folder)), adapter_name=name)
    result = set_peft_model_state_dict(network, load_file(folder / LORA_WEIGHTS), adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing or result.unexpected_keys:
        raise PolicyLoadError(
            f"policy {name}: the LoRA weights in {folder} do not fit the base model's network "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected); give a policy trained from this model"
        )
    for key, param in network.named_parameters():  # peft casts new adapters to the base's dtype; trained ones stay float32
        if f".{name}." in key:
            param.data = param.data.float()
    return lambda: _adapter(network, name)


def _load_full(network: nn.Module, name: str, folder: Path) -> NetworkFor:
    """A float32 copy of the base network holding the fine-tune's weights (as the policy trained in float32)."""
    own = copy.deepcopy(network).requires_grad_(False).eval()
    try:
        own.load_state_dict(load_file(folder / FULL_WEIGHTS), strict=True)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise PolicyLoadError(f"policy {name}: the weights in {folder} do not fit the base model's network "
                              f"({reason}); give a policy trained from this model") from None
    own.float()
    return lambda: _own(own)


def load_policy(model: PolicyModel, name: str, folder: Path | str) -> NetworkFor:
    """How to compute policy `name` from its trained weights (`save_trainable`'s folder): adapter or own copy."""
    folder = Path(folder)
    if (folder / LORA_WEIGHTS).is_file():
        return _attach_lora(model.network, name, folder)
    if (folder / FULL_WEIGHTS).is_file():
        return _load_full(model.network, name, folder)
    raise PolicyLoadError(f"policy {name}: {folder} holds neither {LORA_WEIGHTS} (LoRA) nor {FULL_WEIGHTS} "
                          "(full fine-tune); give a run's final_weights or a checkpoint's weights folder")


class GuidedModel:
    """The base model's prediction replaced by the IRG mixture; everything else (text, latents, VAE) is the base's."""

    def __init__(self, model: PolicyModel, policies: Mapping[str, NetworkFor], weights: Mapping[str, float]) -> None:
        """`weights[k]` is w_k of `policies[k]`; a policy without a weight is an error, not a silent 0."""
        if set(policies) != set(weights):
            raise ValueError(f"irg.policies {sorted(policies)} and irg.weights {sorted(weights)} must name "
                             "the same policies")
        self.model = model
        base = 1.0 - sum(weights.values())
        network = model.network
        terms = [(base, lambda: _base(network))] + [(float(weights[k]), policies[k]) for k in policies]
        self.terms = [(w, network_for) for w, network_for in terms if w != 0.0]

    def predict(self, latents: Tensor, timestep: Tensor | int, cond: dict[str, Tensor]) -> Tensor:
        """sum_j c_j f_j over the terms with c_j != 0 (c_base = 1 - sum_k w_k), each f_j CFG-guided."""
        total: Tensor | None = None
        for coefficient, network_for in self.terms:
            with network_for() as network:
                f = self.model.predict(latents, timestep, cond, network=network)
            part = f if coefficient == 1.0 else coefficient * f
            total = part if total is None else total + part
        return total


def _noise(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device) -> Tensor:
    """One float32 draw per image from its own seed's stream: an image depends on its seed, not its batch."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)


@torch.no_grad()
def sample_images(
    model: PolicyModel, sampler, prompts: list[str], seeds: list[int], batch_size: int,
    predict: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """Images [N, 3, H, W] in [0, 1], image n from prompts[n] and seeds[n], `batch_size` per network call.

    `predict` replaces `model.predict` (a GuidedModel's); `on_batch(n)` is told each batch's size.
    Each image's initial latent and step noise come from its own generator seeded by seeds[n].
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    predict = model.predict if predict is None else predict
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        cond = model.encode(chunk)
        x = _noise(model.latent_shape, generators, model.device)
        for i in range(sampler.num_steps):
            f = predict(x, sampler.timestep(i), cond).float()
            x, _, _ = sampler.step(i, x, f, _noise(model.latent_shape, generators, x.device))
        images.append(model.decode(x).float().cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(images)
