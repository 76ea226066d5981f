"""One model in memory whose weights become any point `Σ_i w_i θ_i` of the landscape, through the soup API.

Full-weight seeds: the seeds' state dicts stay on the CPU and each point loads `soup_state_dicts` (the weighted
sum, paper eq. 3) into one model. LoRA seeds: one base carries one adapter slot that each point fills with the
exact cat soup `soup_lora_adapters` (DESIGN §2); every point is the soup of ALL seeds (zero weights included),
so the slot keeps one rank pattern and the base is never reloaded. Nothing is written to disk per point.
The soup functions are imported from `soup.full` and `soup.lora`, not the `soup.api` facade: that also exports the
stage, whose soup report imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import adapter_base, load_causal_lm, resolve_model_path
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.soup.full import soup_state_dicts
from salsa_lightning.soup.inputs import describe_inputs
from salsa_lightning.soup.lora import load_lora_adapter, soup_lora_adapters

ADAPTER = "landscape"


class SoupModel(Protocol):
    """The role both layouts play: a causal LM (`model`) set to the soup with `weights` by `set_weights`."""

    model: torch.nn.Module
    format: str

    def set_weights(self, weights: Sequence[float]) -> None: ...


class FullSoupModel:
    """Full-weight seeds: `θ = Σ_i w_i θ_i` tensor by tensor, loaded into one model on `device`."""

    format = "full"

    def __init__(self, seeds: Sequence[str], dtype: str, device: torch.device, extrapolate: bool):
        self.extrapolate = extrapolate
        self.state_dicts = []
        model = None
        for path in seeds:
            m = load_causal_lm(ModelSpec(name_or_path=path, dtype=dtype), trainable=False)
            # a copy: the first model becomes the slot, whose parameters every point overwrites
            self.state_dicts.append({k: v.detach().cpu().clone() for k, v in m.state_dict().items()})
            if model is None:
                model = m
        self.model = model.to(device)

    def set_weights(self, weights: Sequence[float]) -> None:
        souped = soup_state_dicts(self.state_dicts, list(weights), allow_extrapolation=self.extrapolate)
        self.model.load_state_dict(souped)


class LoraSoupModel:
    """LoRA seeds on one base: the adapter slot `landscape` holds `W0 + Σ_i w_i s_i B_i A_i` (rank Σ r_i)."""

    format = "lora"

    def __init__(self, seeds: Sequence[str], dtype: str, device: torch.device, extrapolate: bool):
        from peft import get_peft_model

        self.extrapolate = extrapolate
        paths = [resolve_model_path(p) for p in seeds]
        bases = {adapter_base(p) for p in paths}
        if len(bases) > 1:
            raise SalsaError(
                f"The LoRA seeds were trained on different base models ({', '.join(sorted(bases))}); "
                "use seeds of one base model."
            )
        self.adapters = [load_lora_adapter(p) for p in paths]
        first = soup_lora_adapters(self.adapters)  # checks that the seeds fit together, and gives the slot's shape
        base = load_causal_lm(ModelSpec(name_or_path=bases.pop(), dtype=dtype), trainable=False)
        self.model = get_peft_model(base, first.peft_config(), adapter_name=ADAPTER).to(device)
        self.model.requires_grad_(False).eval()
        self.current = first  # the souped adapter the slot holds (what a vLLM engine is handed)
        self._load(first.state_dict)

    def _load(self, state_dict: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state_dict, adapter_name=ADAPTER)
        if result.unexpected_keys:
            raise SalsaError("The souped adapter does not fit the seeds' base model; check that `seeds` share a base.")

    def set_weights(self, weights: Sequence[float]) -> None:
        souped = soup_lora_adapters(self.adapters, list(weights), allow_extrapolation=self.extrapolate)
        self.current = souped
        self._load(souped.state_dict)


def soup_model(seeds: Sequence[str], dtype: str, device: torch.device, extrapolate: bool) -> SoupModel:
    """The layout that fits the seeds (all full weights, or all LoRA adapters of one base)."""
    _, fmt = describe_inputs([resolve_model_path(p) for p in seeds])
    cls = FullSoupModel if fmt == "full" else LoraSoupModel
    return cls(seeds, dtype, device, extrapolate)
